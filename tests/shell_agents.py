"""Agents of the shell client's tests (tests/interop/test_shell_client.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from worker import JobContext


async def steps(input: Any, job: JobContext) -> Any:
    """`n` progress events, `interval` seconds apart, a log line with each."""
    n = int(input.get("n", 5))
    for i in range(n):
        await asyncio.sleep(float(input.get("interval", 0.2)))
        job.log("info", f"step {i + 1}")
        job.progress(i + 1, n, units="steps", message=f"step {i + 1}")
    return {"steps": n}


REGISTRY = ["steps=tests.shell_agents:steps"]
