#!/usr/bin/env python3
"""What an agent environment costs in memory: the supervisor started with the default
environment only, and with one agent environment more (a venv of the same interpreter,
no packages), `--reps` times each; for each fork server and its warm workers, their
USS and PSS (psutil), and the difference the extra environment makes.

    python scripts/bench_lib/environments.py --venv-python .cache/bench-venv/bin/python [--reps 5]

Prints markdown (min / median / max over the repetitions).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).with_name("arcp-supervisor")
READY = re.compile(r"listening on (ws://\S+)")
AGENTS = ["--agent", "noop=examples.agents:echo", "--agent", "other=examples.agents:count"]


def measure(extra: list[str], venv_python: str) -> dict[str, float]:
    """MiB: the whole tree's PSS, and per fork server (with its warm workers) USS and PSS. A
    fork server is the extra environment's when its interpreter is `venv_python` (every
    fork server runs `PYTHON -I -S`, so only the interpreter tells them apart)."""
    proc = subprocess.Popen([str(EXE), "run", "--port", "0", *AGENTS, *extra], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not READY.search(line):
            raise RuntimeError(f"the server did not start: {line!r}")
        time.sleep(2.0)  # the warm workers are forked
        top = psutil.Process(proc.pid)
        out: dict[str, float] = {"tree_pss": 0.0}
        for p in [top, *top.children(recursive=True)]:
            try:
                out["tree_pss"] += p.memory_full_info().pss / 2**20
            except psutil.Error:
                pass
        for i, fs in enumerate(c for c in top.children() if any(a.endswith("worker/__main__.py")
                                                                 for a in c.cmdline()[:4])):
            uss = pss = 0.0
            workers = fs.children()
            for p in [fs, *workers]:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                uss += info.uss / 2**20
                pss += info.pss / 2**20
            env = "venv" if os.path.abspath(fs.cmdline()[0]) == os.path.abspath(venv_python) else "default"
            out[f"{env}_uss"], out[f"{env}_pss"], out[f"{env}_workers"] = uss, pss, float(len(workers))
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def mmm(values: list[float]) -> str:
    return f"{min(values):.1f} / **{statistics.median(values):.1f}** / {max(values):.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--venv-python", required=True)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    one, two = [], []
    for _ in range(args.reps):
        one.append(measure([], args.venv_python))
        two.append(measure(["--agent-python", f"other={args.venv_python}"], args.venv_python))
    if any("venv_uss" not in m for m in two):
        raise SystemExit(f"no fork server ran {args.venv_python}: the extra environment did not start")
    print("## What an agent environment costs in memory\n")
    print(f"{args.reps} repetitions, MiB, min / **median** / max; a fork server counted with its warm workers "
          f"({int(two[0].get('venv_workers', 0))} here); USS is what only those processes hold, PSS adds "
          "their share of pages they share with others (their fork server's, the interpreter's).\n")
    print("| | default environment only | with one agent environment more | difference |")
    print("|---|---|---|---|")
    print(f"| whole process tree, PSS | {mmm([m['tree_pss'] for m in one])} | {mmm([m['tree_pss'] for m in two])} "
          f"| {mmm([b['tree_pss'] - a['tree_pss'] for a, b in zip(one, two)])} |")
    print(f"| the extra environment's fork server and workers, USS | | {mmm([m['venv_uss'] for m in two])} | |")
    print(f"| the extra environment's fork server and workers, PSS | | {mmm([m['venv_pss'] for m in two])} | |")
    print(f"| the default environment's, USS | {mmm([m['default_uss'] for m in one])} "
          f"| {mmm([m['default_uss'] for m in two])} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
