"""The pump reads a worker's next frame only while every session that receives the job's
frames is below its high-water mark: the submitter's, and a follower's (subscribe) too."""

from __future__ import annotations

import asyncio
import socket
import time
from types import SimpleNamespace
from typing import Any

import anyio

from shared import pipe_messages as pm
from shared.pipe_codec import encode
from supervisor.core.outbox import Outbox
from supervisor.jobs.frame_pump import FOLLOWER_GRACE
from supervisor.jobs.runner import JobRunner
from supervisor.jobs.worker_handle import WorkerHandle

JOB = "job_bp"


class _Runtime:
    def __init__(self) -> None:
        self.frame_cap = 1 << 20
        self.store = _Store()
        self.config = SimpleNamespace(max_result_bytes=1 << 20, chunk_size=1 << 16, grace=0.1)
        self.events: list[str] = []

    def emit_event(self, job: Any, kind: str, body: dict[str, Any]) -> None:
        self.events.append(body["message"])


def _blocked_outbox() -> Outbox:
    box = Outbox(high_water=1, low_water=0)
    box.put(b"x")  # at its high-water mark: not writable until the writer takes it
    return box


async def _pump_with(owner: Outbox, follower: Outbox | None,
                     drain_follower: bool = True) -> tuple[list[str], list[bool]]:
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    handle = WorkerHandle(0, ours, loop.create_future())
    await handle.open()
    dropped: list[bool] = []

    def drop_stalled() -> None:  # as Session.drop_stalled: its queue detached
        dropped.append(True)
        if follower is not None:
            follower.detach()

    follower_session = SimpleNamespace(outbox=follower, drop_stalled=drop_stalled)
    watchers = [SimpleNamespace(session=follower_session)] if follower is not None else []
    request = SimpleNamespace(limits=SimpleNamespace(max_runtime=60), max_runtime_sec=None, expires_at=None)
    job = SimpleNamespace(id=JOB, request=request, owner=SimpleNamespace(outbox=owner), done=False,
                          watchers=watchers, authority=None)
    rt = _Runtime()
    runner = JobRunner(rt, job)  # type: ignore[arg-type]
    for i in range(3):
        theirs.sendall(encode([pm.EV, JOB, "log", ["info", f"m{i}", None]], pm.MAX_PIPE_FRAME))
    theirs.sendall(encode([pm.DONE, JOB, None], pm.MAX_PIPE_FRAME))
    outcome: list[Any] = []

    async def pump() -> None:
        outcome.append(await runner._pump(handle))

    async with anyio.create_task_group() as tg:
        tg.start_soon(pump)
        await anyio.sleep(0.2)  # the time the pump has to go past a blocked session, if it would
        seen = list(rt.events)
        with anyio.fail_after(5):
            while not outcome:
                for box in (owner, follower if drain_follower else None):  # the writers take what is queued
                    if box is not None and len(box):
                        await box.get_batch()
                await anyio.sleep(0.01)
    theirs.close()
    handle.close_pipe()
    assert rt.events == ["m0", "m1", "m2"]
    return seen, dropped


def test_a_follower_that_does_not_read_holds_the_job() -> None:
    seen, dropped = asyncio.run(_pump_with(Outbox(), _blocked_outbox()))
    assert seen == ["m0"], "the pump read past a follower at its high-water mark"
    assert dropped == []


def test_a_follower_that_never_reads_is_dropped_after_its_grace_and_the_job_goes_on() -> None:
    t0 = time.monotonic()
    seen, dropped = asyncio.run(_pump_with(Outbox(), _blocked_outbox(), drain_follower=False))
    assert seen == ["m0"] and dropped == [True]
    assert time.monotonic() - t0 >= FOLLOWER_GRACE


def test_the_submitter_that_does_not_read_holds_the_job() -> None:
    seen, _ = asyncio.run(_pump_with(_blocked_outbox(), None))
    assert seen == ["m0"]


def test_sessions_that_read_do_not_hold_it() -> None:
    seen, _ = asyncio.run(_pump_with(Outbox(), Outbox()))
    assert seen == ["m0", "m1", "m2"]


class _Store:
    """The state store's back-pressure, never holding."""

    async def writable(self) -> None:
        return None
