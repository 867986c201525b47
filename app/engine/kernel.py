"""A fused CPU kernel for the per-row RoAd update, compiled once on first use, with the eager path as fallback.

The eager update (:class:`app.engine.road.RowRoadLinear`) is ``addcmul(y * C, y.flip(3), S)``: three
kernels and two temporaries per adapted layer, and ``flip`` alone costs as much as the rest (on SmolLM2 at
batch 16 the update added 10% to a decode step with all seven projections adapted). :func:`road_linear` does
the projection, then the rotation in place in one pass over ``y``: one call from Python per layer.

The kernel computes exactly what the eager path computes, with the same rounding (``fma(b, s, a·c)``, as
ATen's vectorised ``addcmul`` does; no other contraction: it is built with ``-ffp-contract=off``), so the two
paths give bit-identical outputs (tested) and switching between them never changes a token.

``fold_rows`` rotates a weight matrix's rows instead (``W ← R·W``): :func:`app.engine.road.fold`, what the engine
uses when a whole batch shares one mix.

Building takes about 20 s on 2 cores (g++ and ninja, the ``ninja`` wheel is a dependency) and happens once per
machine, into :func:`cache_dir` (``$TORCH_EXTENSIONS_DIR/adapter-hub``, default under ``~/.cache``). The
engine starts it in the background (:func:`prepare`) and runs the eager path until it is ready.
``ADAPTER_HUB_KERNEL=eager`` never builds it; ``=fused`` waits for it and fails loudly if it cannot be built.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ENV = "ADAPTER_HUB_KERNEL"
MODES = ("auto", "eager", "fused")

SOURCE = r"""
#include <cmath>
#include <torch/extension.h>
#include <ATen/Parallel.h>

// y: (rows, G, 2, H) contiguous; c, s: (B or 1, G, 2, H) float32, each table row contiguous (rows may be
// views into one packed tensor: cstride, sstride apart; 0 for one shared row); row r of y uses table r / L.
// Pair (y0, y1) = (y[.., 0, j], y[.., 1, j]) becomes (y0*c0 + y1*s0, y1*c1 + y0*s1), rounded as
// addcmul(y * c, y.flip(-2), s) rounds it: y0*c0 rounded, then one fused multiply-add (no other contraction:
// built with -ffp-contract=off).
template <typename T>
static void rotate_rows(T* y, const float* c, const float* s, int64_t rows, int64_t L, int64_t G, int64_t H,
                        int64_t cstride, int64_t sstride) {
  const int64_t width = G * 2 * H;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / width), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* yr = y + r * width;
      const float* cr = c + (r / L) * cstride;
      const float* sr = s + (r / L) * sstride;
      for (int64_t g = 0; g < G; ++g) {
        T* __restrict__ y0 = yr + g * 2 * H;
        T* __restrict__ y1 = y0 + H;
        const float* __restrict__ c0 = cr + g * 2 * H;
        const float* __restrict__ c1 = c0 + H;
        const float* __restrict__ s0 = sr + g * 2 * H;
        const float* __restrict__ s1 = s0 + H;
        for (int64_t j = 0; j < H; ++j) {
          const float a = static_cast<float>(y0[j]);
          const float b = static_cast<float>(y1[j]);
          y0[j] = static_cast<T>(std::fma(b, s0[j], a * c0[j]));
          y1[j] = static_cast<T>(std::fma(a, s1[j], b * c1[j]));
        }
      }
    }
  });
}

static void check_tables(const torch::Tensor& y, const torch::Tensor& c, const torch::Tensor& s) {
  TORCH_CHECK(y.device().is_cpu() && c.device().is_cpu() && s.device().is_cpu(), "road kernel: CPU tensors only");
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat, "road kernel: float32 tables");
  TORCH_CHECK(c.dim() == 5 && c.sizes() == s.sizes(), "road kernel: tables of shape (B, 1, G, 2, H)");
  TORCH_CHECK(y.is_contiguous() && c[0].is_contiguous() && s[0].is_contiguous(),
              "road kernel: a contiguous output and contiguous table rows");
  TORCH_CHECK(c.size(0) == 1 || c.size(0) == y.size(0), "road kernel: one table row, or one per batch row");
  TORCH_CHECK(y.size(-1) == c.size(2) * 2 * c.size(4), "road kernel: output width does not match the tables");
}

// In place: every row of y (batch, ..., G*2*H) rotated by its batch row's tables.
torch::Tensor road_(torch::Tensor y, torch::Tensor c, torch::Tensor s) {
  check_tables(y, c, s);
  const int64_t B = y.size(0), G = c.size(2), H = c.size(4);
  const int64_t rows = y.numel() / (G * 2 * H);
  const int64_t L = B ? rows / B : 1;
  const int64_t cstride = c.size(0) == 1 ? 0 : c.stride(0);
  const int64_t sstride = s.size(0) == 1 ? 0 : s.stride(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "road_", [&] {
    rotate_rows<scalar_t>(y.data_ptr<scalar_t>(), c.data_ptr<float>(), s.data_ptr<float>(), rows,
                          std::max<int64_t>(L, 1), G, H, cstride, sstride);
  });
  return y;
}

torch::Tensor road_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> b, torch::Tensor c,
                          torch::Tensor s) {
  auto y = at::linear(x, w, b);
  if (!y.is_contiguous()) y = y.contiguous();
  return road_(y, c, s);
}

// W (out, in) with out = G*2*H: row pairs (g, 0, j), (g, 1, j) combined as the outputs are (R·W); c, s (G, 2, H).
torch::Tensor fold_rows(torch::Tensor w, torch::Tensor c, torch::Tensor s) {
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == at::kFloat, "fold: float32 CPU weight");
  TORCH_CHECK(c.scalar_type() == at::kFloat && s.scalar_type() == at::kFloat && c.is_contiguous() && s.is_contiguous(),
              "fold: float32 tables");
  const int64_t G = c.size(0), H = c.size(2), n = w.size(0) == 0 ? 0 : w.numel() / w.size(0);
  TORCH_CHECK(w.size(0) == G * 2 * H, "fold: weight rows do not match the tables");
  auto out = torch::empty_like(w);
  const float* W = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float* C = c.data_ptr<float>();
  const float* S = s.data_ptr<float>();
  at::parallel_for(0, G * H, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t g = p / H, j = p % H;
      const int64_t r0 = g * 2 * H + j, r1 = r0 + H;
      const float c0 = C[g * 2 * H + j], c1 = C[g * 2 * H + H + j];
      const float s0 = S[g * 2 * H + j], s1 = S[g * 2 * H + H + j];
      const float* __restrict__ a = W + r0 * n;
      const float* __restrict__ b = W + r1 * n;
      float* __restrict__ o0 = O + r0 * n;
      float* __restrict__ o1 = O + r1 * n;
      for (int64_t k = 0; k < n; ++k) {
        o0[k] = std::fma(b[k], s0, a[k] * c0);
        o1[k] = std::fma(a[k], s1, b[k] * c1);
      }
    }
  });
  return out;
}
"""

_FLAGS = ["-O3", "-ffp-contract=off", "-march=native"]  # built where it runs: this CPU's vector width
_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "error": None, "thread": None}

FUSED: Any = None
"""The compiled module once built (and wanted), else ``None``: what :class:`~app.engine.road.RowRoadLinear` reads
on every call, so it is a plain global, not a function."""


def mode() -> str:
    """``$ADAPTER_HUB_KERNEL``: ``auto`` (default: build in the background, use once ready), ``eager`` or
    ``fused`` (wait for the build; raise if it fails)."""
    m = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"{ENV}={m!r}: expected one of {', '.join(MODES)}.")
    return m


def _cpu() -> str:
    """What ``-march=native`` depends on, so a home folder shared by machines of other CPUs builds again."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _name() -> str:
    digest = hashlib.sha256((SOURCE + torch.__version__ + " ".join(_FLAGS) + sys.version + _cpu()).encode()
                            ).hexdigest()
    return f"adapter_hub_road_{digest[:12]}"


def cache_dir() -> Path:
    """Where built kernels are kept: ``$TORCH_EXTENSIONS_DIR/adapter-hub`` (default ``~/.cache/torch_extensions``)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                   "torch_extensions")
    return Path(root) / "adapter-hub"


def _import(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(name: str, target: Path) -> Any:
    """Build in a private folder and move the library into place: no lock files, so a process killed
    mid-build leaves nothing that stops the next one (its folder is removed after an hour)."""
    try:
        import ninja  # the wheel's binary, where the system has none

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    from torch.utils.cpp_extension import load_inline

    target.parent.mkdir(parents=True, exist_ok=True)
    for old in target.parent.glob(f".{name}.*"):
        if time.time() - old.stat().st_mtime > 3600:
            shutil.rmtree(old, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}."))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = load_inline(name, cpp_sources=SOURCE, functions=["road_", "road_linear", "fold_rows"],
                              extra_cflags=_FLAGS, build_directory=str(tmp), verbose=False)
        os.replace(tmp / f"{name}.so", target)
        # Builds of other sources or torch versions, a week old: another checkout may still use a recent one.
        for stale in target.parent.glob("adapter_hub_road_*.so"):
            if stale != target and time.time() - stale.stat().st_mtime > 7 * 86400:
                stale.unlink(missing_ok=True)
        return mod
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build() -> None:
    global FUSED
    name = _name()
    target = cache_dir() / f"{name}.so"
    try:
        mod = None
        if target.is_file():
            try:
                mod = _import(name, target)
            except Exception:  # noqa: BLE001 - unreadable or foreign: build it again
                mod = None
        if mod is None:
            mod = _compile(name, target)
        _state["module"] = mod
        if mode() != "eager":
            FUSED = mod
    except Exception as e:  # noqa: BLE001 - no compiler, no headers ...: the eager path serves, a warning says why
        _state["error"] = e
        if mode() != "fused":
            warnings.warn(f"The fused RoAd kernel could not be built ({type(e).__name__}: {str(e)[:300]}); the "
                          f"engine uses the eager path (about 10% slower with every projection adapted). Set "
                          f"{ENV}=eager to skip the build.", RuntimeWarning, stacklevel=2)


def prepare(wait: bool = False) -> Any:
    """Start building the kernel in a background thread (once); with ``wait``, block until it is done.

    Returns:
        The compiled module, or ``None`` (not ready yet, failed, or ``ADAPTER_HUB_KERNEL=eager``).

    Raises:
        RuntimeError: ``ADAPTER_HUB_KERNEL=fused`` and the build failed.
    """
    m = mode()
    if m == "eager":
        return None
    with _lock:
        if _state["thread"] is None and _state["module"] is None and _state["error"] is None:
            t = threading.Thread(target=_build, name="road-kernel-build", daemon=True)
            _state["thread"] = t
            t.start()
    t = _state["thread"]
    if (wait or m == "fused") and t is not None:
        t.join()
    if m == "fused" and _state["module"] is None:
        raise RuntimeError(f"{ENV}=fused but the fused RoAd kernel could not be built: {_state['error']}")
    return _state["module"]


