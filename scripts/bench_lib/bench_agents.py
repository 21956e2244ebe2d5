"""Agents for scripts/bench_lib/authority.py and egress.py (served with this folder as working
directory). egress.py also runs the egress_* functions in a plain host Python, with `job` None."""

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


def _egress_opener(direct: bool) -> Any:
    """urllib's opener: the environment's proxies (in a job: the supervisor's egress proxy),
    or none at all (`direct`, on the host). Otherwise the same code both ways."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({} if direct else None))


def _egress_proxy() -> str:
    import os

    return os.environ.get("http_proxy") or os.environ.get("HTTP_PROXY") or ""


def egress_download(input: Any, job: Any) -> Any:
    """GET `url` (a large body) with urllib, reading into a preallocated 1 MiB buffer; the time
    from before the request to the last byte, inside the agent."""
    import time

    direct = bool(input.get("direct"))
    opener = _egress_opener(direct)
    buf = memoryview(bytearray(1 << 20))
    got = 0
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        with opener.open(input["url"], timeout=float(input.get("timeout", 30))) as r:
            status = r.status
            while n := r.readinto(buf):
                got += n
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    except Exception as e:  # reported, not raised: the benchmark shows why
        return {"error": f"{type(e).__name__}: {e}"[:500], "bytes": got, "proxy": _egress_proxy()}
    return {"status": status, "bytes": got, "seconds": dt, "mib_s": got / 2**20 / dt, "cpu_s": cpu, "direct": direct,
            "proxy": "" if direct else _egress_proxy()}


def egress_small(input: Any, job: Any) -> Any:
    """`n` sequential GETs of `url` (a tiny body) with urllib, a fresh connection each, after
    `warmup` untimed ones; latency percentiles in ms, timed inside the agent."""
    import time

    direct = bool(input.get("direct"))
    opener = _egress_opener(direct)
    n, warmup = int(input.get("n", 300)), int(input.get("warmup", 10))
    timeout = float(input.get("timeout", 30))
    times: list[float] = []
    size = 0
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            with opener.open(input["url"], timeout=timeout) as r:
                body = r.read()
                status = r.status
            dt = time.perf_counter() - t0
            if status != 200:
                return {"error": f"status {status} at request {i}", "proxy": _egress_proxy()}
            size = len(body)
            if i >= warmup:
                times.append(dt)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:500], "done": len(times), "proxy": _egress_proxy()}
    times.sort()

    def pct(q: float) -> float:
        return times[min(n - 1, int(q * n))] * 1e3

    return {"n": n, "body_bytes": size, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99),
            "min_ms": times[0] * 1e3, "mean_ms": sum(times) / n * 1e3, "direct": direct,
            "proxy": "" if direct else _egress_proxy()}


async def span(input: Any, job: Any) -> Any:
    """Sleep `seconds`; when it started and ended (wall clock), for admission_wait.py."""
    import asyncio

    start = time.time()
    await asyncio.sleep(float(input.get("seconds", 0.2)))
    return {"start": start, "end": time.time()}
