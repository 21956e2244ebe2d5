"""Where a cancel's signal may raise in an async agent's worker: into the agent's task, or
out of the event loop, never into a callback asyncio runs (it would log and drop the error,
and the callback that stops run_until_complete would leave the loop running until the
supervisor's grace ran out)."""

from __future__ import annotations

import asyncio
import sys
from types import FrameType
from typing import Any

from worker.runner import reaches_the_agent


def _frames() -> dict[str, FrameType]:
    got: dict[str, FrameType] = {}

    def helper() -> None:  # a sync function the agent's coroutine calls
        got["helper in a coroutine"] = sys._getframe()

    async def agent() -> None:
        got["agent's coroutine"] = sys._getframe()
        helper()
        await asyncio.sleep(0)

    def callback() -> None:
        got["a loop callback"] = sys._getframe()

    def done(_: Any) -> None:
        got["a task's done callback"] = sys._getframe()

    loop = asyncio.new_event_loop()
    try:
        loop.call_soon(callback)
        task = loop.create_task(agent())
        task.add_done_callback(done)
        loop.run_until_complete(task)
        loop.run_until_complete(asyncio.sleep(0))  # the done callback runs
    finally:
        loop.close()
    got["no loop"] = sys._getframe()
    return got


def test_only_frames_whose_error_reaches_the_task_or_leaves_the_loop_are_interrupted() -> None:
    f = _frames()
    assert reaches_the_agent(f["agent's coroutine"])
    assert reaches_the_agent(f["helper in a coroutine"])
    assert reaches_the_agent(f["no loop"])
    assert not reaches_the_agent(f["a loop callback"])
    assert not reaches_the_agent(f["a task's done callback"])
