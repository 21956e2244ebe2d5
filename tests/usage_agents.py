"""Agents whose use of memory, CPU and processes is known, for the usage figures of a job's
terminal frame and of `session.list_jobs` (tests/interop/test_usage.py)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from tests.agents import burn_cpu_then_exit
from worker import JobContext

PAGE = os.sysconf("SC_PAGE_SIZE")


def touch_memory(input: Any, job: JobContext) -> Any:
    """Allocates `mib` MiB, writes to every page of it, holds it `hold` s, lets it go."""
    mib, hold = int(input.get("mib", 160)), float(input.get("hold", 0.3))
    block = bytearray(mib << 20)
    for i in range(0, len(block), PAGE):
        block[i] = 1
    time.sleep(hold)
    del block
    return {"touched_mib": mib}


def spin(input: Any, job: JobContext) -> Any:
    """Busy for `seconds` of wall time; what it saw of its own CPU time meanwhile."""
    seconds = float(input.get("seconds", 1.0))
    t0, c0 = time.monotonic(), time.process_time()
    while time.monotonic() - t0 < seconds:
        pass
    return {"wall": time.monotonic() - t0, "cpu": time.process_time() - c0}


def fork_burn(input: Any, job: JobContext) -> Any:
    """`n` children at once, each burning `each` s of CPU; the parent only waits."""
    n, each = int(input.get("n", 2)), float(input.get("each", 0.5))
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            burn_cpu_then_exit(each)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return {"children": n, "children_cpu": n * each}


def hold_procs(input: Any, job: JobContext) -> Any:
    """Holds `n` sleeping children at once for `hold` s (the worker is one more process)."""
    n, hold = int(input.get("n", 5)), float(input.get("hold", 0.5))
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        pids.append(pid)
    time.sleep(hold)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"held": n + 1}


REGISTRY = [
    "touchmem=tests.usage_agents:touch_memory", "spinner=tests.usage_agents:spin",
    "forkburn=tests.usage_agents:fork_burn", "holdprocs=tests.usage_agents:hold_procs",
]
