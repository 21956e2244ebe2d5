"""Example agents served by scripts/run."""

from __future__ import annotations

import asyncio
from typing import Any

from worker import JobContext


async def echo(input: Any, job: JobContext) -> Any:
    job.log("info", "echoing")
    return {"echo": input}


def count(input: Any, job: JobContext) -> Any:
    n = int((input or {}).get("n", 10))
    for i in range(n):
        job.progress(i + 1, n, units="items")
    return {"done": n}


def stream_text(input: Any, job: JobContext) -> None:
    lines = int((input or {}).get("lines", 100))
    with job.stream_result("utf8") as out:
        for i in range(lines):
            out.write(f"line {i}\n")


async def sleep(input: Any, job: JobContext) -> Any:
    seconds = float((input or {}).get("seconds", 1.0))
    job.status("sleeping", f"{seconds} s")
    await asyncio.sleep(seconds)
    return {"slept": seconds}
