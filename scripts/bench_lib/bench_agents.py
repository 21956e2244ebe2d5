"""Agents for scripts/bench_lib/authority.py (served with this folder as working directory)."""

from __future__ import annotations

import time
from typing import Any


def leaseops(input: Any, job: Any) -> Any:
    """Time `n` validate_lease_op round trips to the supervisor, inside the agent."""
    n = int(input.get("n", 5000))
    target = input.get("target", "/data/reports/q3.csv")
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        job.validate_lease_op("fs.read", target)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"n": n, "p50_us": times[n // 2] * 1e6, "p99_us": times[int(n * 0.99)] * 1e6,
            "max_us": times[-1] * 1e6}
