"""bench/gpu.sh, the prepared GPU run, end to end in its dry run: the same steps, tiny, on the CPU (about 40 s)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")), reason="needs bash and timeout")
def test_dry_run_writes_every_output_the_device_run_brings_back(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTER_HUB_TEST_DEVICE", None)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench-tiny.log", "bench-tiny.txt", "env.txt", "summary.txt", "tests.log"]
    # the device tool brings back at most 8 files, named in letters, digits, '.', '_' and '-'
    assert all(n.replace(".", "").replace("_", "").replace("-", "").isalnum() for n in names)
    assert "mode: dry" in (out / "env.txt").read_text() and "torch " in (out / "env.txt").read_text()
    assert "1 passed" in (out / "tests.log").read_text()
    bench = (out / "bench-tiny.txt").read_text()
    assert "random tiny" in bench and "bfloat16" in bench
    for row in ("base model", "ours 2 road", "peft 2 road", "ours 2 lora", "peft 2 lora", "mix change"):
        assert row in bench, row
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary] == [["tests", "rc=0"], ["bench", "tiny"]]
    assert all("rc=0" in line for line in summary)


def test_usage_error_exits_2():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
