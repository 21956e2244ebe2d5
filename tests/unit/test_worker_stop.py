"""Ending a worker is one escalation (WorkerHandle.stop): grace, SIGTERM, then SIGKILL. A job's
cancel goes through it, and a worker that ignores SIGTERM is killed once grace has passed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

import anyio

from shared.messages import CANCELLED
from supervisor.jobs.runner import JobRunner
from supervisor.jobs.worker_handle import EXIT_WAIT, KILL_SLACK, WorkerHandle

GRACE = 0.3
STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.write(int(sys.argv[1]), b"r")  # ready: SIGTERM is ignored from here on
time.sleep(60)
"""


async def _stubborn_worker() -> tuple[WorkerHandle, list[int]]:
    """A process that ignores SIGTERM, in a session of its own, with the handle the pool would
    give it: its pipe, and its exit status reported when it has exited (as the fork server's
    reaper does). Also the signals sent to it, in order."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                            start_new_session=True)
    theirs.close()
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(proc.pid)

    def reaped() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        exited.set_result(os.waitpid(proc.pid, 0)[1])

    loop.add_reader(pidfd, reaped)
    handle = WorkerHandle(proc.pid, ours, exited)
    await handle.open()
    assert handle.reader is not None
    assert await handle.reader.readexactly(1) == b"r"
    sent: list[int] = []
    real = handle.signal

    def signal_(sig: int) -> None:
        sent.append(sig)
        real(sig)

    handle.signal = signal_  # type: ignore[method-assign]
    return handle, sent


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored() -> None:
    async def go() -> None:
        handle, sent = await _stubborn_worker()
        ended = asyncio.Event()  # its job never reports an end
        t0 = time.monotonic()
        await handle.stop(GRACE, ended=ended)
        took = time.monotonic() - t0
        assert sent == [signal.SIGTERM, signal.SIGKILL]
        assert handle.exited.done() and _killed(handle.exited.result())
        assert GRACE + KILL_SLACK - 0.05 <= took <= GRACE + KILL_SLACK + EXIT_WAIT + 0.5, took
        assert handle.writer is not None and handle.writer.is_closing()
    asyncio.run(go())


class _Runtime:
    """What JobRunner asks of the runtime in a cancel."""

    def __init__(self) -> None:
        self.frame_cap = 1 << 20
        self.store = _Store()
        self.config = SimpleNamespace(max_result_bytes=1 << 20, chunk_size=1 << 16, grace=GRACE)
        self.finished: list[tuple[str, Any]] = []
        self.cancelled: list[str] = []

    def emit_cancelled(self, job: Any, reason: str) -> None:
        self.cancelled.append(reason)

    def finish(self, job: Any, status: str, err: Any, **kw: Any) -> None:
        job.done = True
        self.finished.append((status, err))


def test_a_cancel_ends_a_worker_that_ignores_it_and_sigterm_through_the_one_escalation() -> None:
    async def go() -> None:
        handle, sent = await _stubborn_worker()
        stops: list[float] = []
        real_stop = handle.stop

        async def stop(grace: float, ended: asyncio.Event | None = None, kill_wait: float = EXIT_WAIT) -> None:
            stops.append(grace)
            await real_stop(grace, ended, kill_wait)

        handle.stop = stop  # type: ignore[method-assign]
        rt = _Runtime()
        request = SimpleNamespace(limits=SimpleNamespace(max_runtime=60), max_runtime_sec=None, expires_at=None)
        job = SimpleNamespace(id="job_1", request=request, owner=SimpleNamespace(outbox=None), done=False)
        runner = JobRunner(rt, job)  # type: ignore[arg-type]
        runner.started = True
        runner.life.admitted(time.monotonic())
        on_worker = anyio.Event()

        async def run() -> None:  # the job's life from the moment it has a worker: its pump
            runner.worker = handle
            on_worker.set()
            await runner._pump(handle)
            runner._pump_done.set()

        runner._run = run  # type: ignore[method-assign]
        t0 = time.monotonic()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner._life)
                await on_worker.wait()
                t0 = time.monotonic()
                runner.request_stop("cancel", "stop it")
        took = time.monotonic() - t0
        assert stops == [GRACE], "the runner's stop did not go through WorkerHandle.stop"
        assert sent == [signal.SIGTERM, signal.SIGKILL]
        assert _killed(handle.exited.result())
        assert [s for s, _ in rt.finished] == [CANCELLED] and rt.cancelled == ["stop it"]
        assert GRACE + KILL_SLACK - 0.05 <= took <= GRACE + KILL_SLACK + EXIT_WAIT + 0.5, took
    asyncio.run(go())


class _Store:
    """The state store's back-pressure, never holding."""

    async def writable(self) -> None:
        return None
