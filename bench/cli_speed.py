"""How fast the ``hub`` command answers, measured beside ``python -c pass`` in the same run.

Each command runs as its own process (as a user types it), ``--repeats`` times, interleaved with the others;
the table gives the median wall time, the median minus the interpreter's own start (``python -c pass``), and
the issue's goal. The store is a fresh temporary one seeded with one shipped adapter, so the numbers do not
depend on what your own store holds::

    python bench/cli_speed.py                 # 7 repeats
    python bench/cli_speed.py --repeats 11

Goals (issue 19): ``hub --help`` < 0.5 s, ``hub log`` and ``hub list`` < 1 s, ``hub push`` of a shipped
adapter < 1 s (it checks the folder without torch or PEFT: :mod:`composer.precheck`). The machine's load
average is printed before and after the run: on a shared machine, read the figures with it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HUB = [sys.executable, "-m", "app.cli"]  # the console script 'hub' runs the same code (app.cli:main)


def _run(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    return dt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--adapter", default="upper", help="shipped adapter to push (default: upper)")
    args = ap.parse_args(argv)

    folder = ROOT / "adapters" / args.adapter
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="hub-cli-speed-") as tmp:
        env = dict(os.environ, ADAPTER_HUB_HOME=tmp, ADAPTER_HUB_NO_EXAMPLES="1", HF_HUB_OFFLINE="1",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        _run(HUB + ["push", str(folder), "bench/speed"], env)  # the repo exists; 'log' has a version to show
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "hub --help": HUB + ["--help"],
            "hub log": HUB + ["log", "bench/speed"],
            "hub list": HUB + ["list"],
            "hub push (shipped adapter)": HUB + ["push", str(folder), "bench/speed", "--allow-empty"],
        }
        goals = {"hub --help": 0.5, "hub log": 1.0, "hub list": 1.0, "hub push (shipped adapter)": 1.0}
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(_run(cmd, env))
    base = statistics.median(times["python -c pass"])
    print(f"{'command':28} {'median s':>9} {'min-max s':>13} {'- python':>9} {'goal s':>7}  ok   "
          f"(median of {args.repeats}, {os.cpu_count()} CPUs, {sys.version.split()[0]}, "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after)")
    for name, ts in times.items():
        med = statistics.median(ts)
        goal = goals.get(name)
        ok = "" if goal is None else ("yes" if med < goal else "NO")
        spread = f"{min(ts):.3f}-{max(ts):.3f}"
        print(f"{name:28} {med:9.3f} {spread:>13} {med - base:9.3f} {'' if goal is None else f'{goal:7.1f}':>7}  {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
