#!/usr/bin/env bash
# One short run on a GPU machine (issue 20 item 4): the engine's tests on CUDA, then the mixed-batch bench in
# bfloat16 on random models of SmolLM2-135M's and Llama-3-8B's shape, against the base model and PEFT's
# adapter_names path. Everything lands in $OUT (default ./gpu-out); each step has its own time limit, so a slow
# step leaves the others their time, and a step that fails does not stop the next.
#
#   $OUT/env.txt              python, torch, CUDA, the GPU, package versions, nvidia-smi, pip list
#   $OUT/tests.log            pytest on the engine's tests, models on the GPU (ADAPTER_HUB_TEST_DEVICE)
#   $OUT/bench-SHAPE.txt      bench/mixed_batch.py's tables (stdout); bench-SHAPE.log: its progress (stderr)
#   $OUT/summary.txt          each step's exit status and seconds
#
# Usage:
#   bash bench/gpu.sh              # on the device machine: python3 there holds a CUDA torch (nothing is installed)
#   bash bench/gpu.sh --dry-run    # the same steps, tiny, on this machine's CPU (tests/test_gpu_script.py runs it)
#   bash bench/gpu.sh --wheels     # here, before the device run: the tested PEFT as a wheel in .whl/ (carry it)
#
# The device machine reaches no network. Where .whl/ holds wheels (carried), they are installed with --no-index
# into /tmp/site, in front of the machine's own packages; else its own peft/transformers are used (env.txt says
# which). Without CUDA the run falls back to the dry run and says so. PYTHON picks the interpreter (python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
MODE=gpu
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --wheels) MODE=wheels ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run | --wheels]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}

if [ "$MODE" = wheels ]; then
  # PEFT is the oracle and the baseline: run the version the suite passed on (constraints.txt), not whatever the
  # machine has. Pure Python; its requirements (torch, transformers, accelerate ...) are on the machine.
  peft=$(grep -i '^peft==' constraints.txt) || { echo "constraints.txt pins no peft" >&2; exit 1; }
  rm -rf .whl && mkdir -p .whl
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "$peft"
fi

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export ADAPTER_HUB_NO_EXAMPLES=1
export ADAPTER_HUB_KERNEL=eager  # the fused RoAd kernel is the CPU's (float32): don't spend the lease compiling it
# Time limits per step, seconds (sum 460: the device command's timeout_s of 540 leaves room for the probe).
T_TESTS=${T_TESTS:-150} T_SMOL=${T_SMOL:-120} T_LLAMA=${T_LLAMA:-180}
: >"$OUT/summary.txt"

step() {  # step NAME SECONDS STDOUT STDERR CMD...: run CMD under a time limit, note its status and duration
  local name=$1 limit=$2 out=$3 err=$4; shift 4
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" >&2
  if [ "$out" = "$err" ]; then
    timeout -k 10 "$limit" "$@" >"$out" 2>&1
  else
    timeout -k 10 "$limit" "$@" >"$out" 2>"$err"
  fi
  rc=$?
  [ $rc -eq 124 ] && echo "$name: stopped at its ${limit} s limit" >>"$err"
  printf '%-22s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >>"$OUT/summary.txt"
  echo "   rc=$rc in $((SECONDS - t0)) s" >&2
  [ $rc -eq 0 ]
}

if [ "$MODE" = gpu ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

{
  echo "mode: $MODE; $(date -u +%FT%TZ); $(uname -srm); $(nproc --all) CPUs"
  echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
  "$PY" - <<'EOF'
import importlib.metadata
import importlib.util

import torch

print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, built for CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
# Found and versioned without importing them (transformers and peft alone take seconds to import): the copy on the
# path, /tmp/site's where the carried wheels went, and its installed version.
DISTS = {"yaml": "PyYAML", "xdist": "pytest-xdist", "huggingface_hub": "huggingface-hub"}
for name in ("transformers", "peft", "safetensors", "huggingface_hub", "numpy", "yaml", "tqdm", "pytest", "xdist"):
    spec = importlib.util.find_spec(name)
    if spec is None:
        print(f"{name}: MISSING")
        continue
    try:
        version = importlib.metadata.version(DISTS.get(name, name))
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    print(f"{name} {version} ({spec.origin})")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi
  if [ "$MODE" = gpu ]; then echo "--- pip list"; "$PY" -m pip list 2>&1; fi
} >"$OUT/env.txt" 2>&1
head -n 20 "$OUT/env.txt" >&2

if [ "$MODE" = gpu ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  echo "no CUDA device visible to $PY: running the dry run's tiny CPU steps instead" | tee -a "$OUT/summary.txt" >&2
  MODE=dry
fi

failed=0
if [ "$MODE" = gpu ]; then
  # The engine's tests with every tiny model on the GPU (float32: they compare with PEFT to 1e-4), in parallel
  # where pytest-xdist is there. test_engine_kernel.py is left out: the fused kernel is the CPU's.
  par=(); "$PY" -c 'import xdist' 2>/dev/null && par=(-n 8)
  ADAPTER_HUB_TEST_DEVICE=cuda step tests "$T_TESTS" "$OUT/tests.log" "$OUT/tests.log" \
    "$PY" -m pytest -q -rfE -p no:cacheprovider "${par[@]}" tests/test_engine.py tests/test_engine_lora.py \
    tests/test_continuous.py tests/test_prefill.py tests/test_architectures.py || failed=1
  for shape in smollm2 llama3-8b; do
    limit=$T_SMOL; [ "$shape" = llama3-8b ] && limit=$T_LLAMA
    step "bench $shape" "$limit" "$OUT/bench-$shape.txt" "$OUT/bench-$shape.log" \
      "$PY" bench/mixed_batch.py --shape "$shape" --device cuda --dtype bfloat16 --repeats 3 || failed=1
  done
else
  # The same steps, tiny: one of the engine's tests on the CPU, the bench on a 2-layer random Llama in bfloat16.
  ADAPTER_HUB_TEST_DEVICE=cpu step tests "$T_TESTS" "$OUT/tests.log" "$OUT/tests.log" \
    "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_engine.py -k base_rows || failed=1
  step "bench tiny" "$T_SMOL" "$OUT/bench-tiny.txt" "$OUT/bench-tiny.log" \
    "$PY" bench/mixed_batch.py --shape tiny --device cpu --dtype bfloat16 --batches 4 --mixes 1 2 --repeats 1 \
    --steps 2 --threads 1 || failed=1
fi
cat "$OUT/summary.txt" >&2
exit $failed
