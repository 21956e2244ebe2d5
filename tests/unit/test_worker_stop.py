"""Ending a worker is one escalation (WorkerHandle.stop): grace, SIGTERM, then SIGKILL. A job's
cancel goes through it, and a worker that ignores SIGTERM is killed once grace has passed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import anyio

from shared import pipe_messages as pm
from shared.messages import CANCELLED
from shared.pipe_codec import FrameDecoder
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

        async def run() -> None:  # the job's life from the moment its worker has it: its pump
            runner.worker = handle
            runner._sent = True
            on_worker.set()
            await runner._pump(handle)
            runner._pump_done.set()

        runner._run = run  # type: ignore[method-assign]
        t0 = time.monotonic()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.run)
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
    """The state store's back-pressure, never holding, and a job's start, kept nowhere."""

    async def writable(self) -> None:
        return None

    def job_running(self, job_id: str) -> None:
        return None


async def _idle_worker() -> tuple[WorkerHandle, socket.socket]:
    """A process that ends at SIGTERM, with the handle the pool would give it, and the other end of
    its pipe: what the supervisor writes to the worker is read there."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
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
    return handle, theirs


class _Job:
    """The job as the runner sees it (hashable, as the tracing's table of jobs needs)."""

    def __init__(self, request: Any) -> None:
        self.id = "job_1"
        self.request = request
        self.owner = SimpleNamespace(outbox=None)
        self.done = False
        self.status = "pending"


def test_a_stop_while_the_worker_is_made_ready_does_not_send_the_job_and_does_not_wait_for_the_grace() -> None:
    """A cancel that comes while a fresh worker is being made ready for its job (its limits and
    temp dir, on a thread): the job is not sent after it, nor a cancel before it (a worker takes a
    cancel for the job it runs: one that comes before the job is lost, and the job, sent after it,
    would run until the grace ran out). The terminal comes once the set-up is over."""
    grace = 5.0

    async def go() -> None:
        handle, theirs = await _idle_worker()
        rt = _Runtime()
        rt.config.grace = grace
        rt.config.usage = False
        rt.uids = None  # type: ignore[attr-defined]
        preparing, stopped = threading.Event(), threading.Event()

        def job_tmp_dir(job: Any, worker: WorkerHandle) -> None:  # on the set-up's thread
            preparing.set()
            stopped.wait(5)

        async def acquire(key: Any) -> WorkerHandle:
            return handle

        pool = SimpleNamespace(acquire=acquire, retire=lambda h: (h.signal(signal.SIGKILL), h.close_pipe()))

        async def get(environment: Any) -> Any:
            return SimpleNamespace(pool=pool, fork_server=None)

        rt.environments = SimpleNamespace(get=get)  # type: ignore[attr-defined]
        rt.reuse_key = lambda job: "key"  # type: ignore[attr-defined]
        rt.job_tmp_dir = job_tmp_dir  # type: ignore[attr-defined]
        rt.job_spec = lambda job, port: {"job_id": job.id}  # type: ignore[attr-defined]
        request = SimpleNamespace(limits=SimpleNamespace(max_runtime=60, memory=1 << 40), max_runtime_sec=None,
                                  expires_at=None, lease={}, agent=SimpleNamespace(environment=None))
        runner = JobRunner(rt, _Job(request))  # type: ignore[arg-type]
        runner.started = True
        runner.life.admitted(time.monotonic())
        with anyio.fail_after(grace + 10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner.run)
                await anyio.to_thread.run_sync(preparing.wait, 5)
                t0 = time.monotonic()
                runner.request_stop("cancel", "stop it")
                await anyio.sleep(0.05)  # the stopper's turn, while the set-up still runs
                stopped.set()
        took = time.monotonic() - t0
        theirs.setblocking(False)
        got = b""
        try:
            while data := theirs.recv(1 << 16):
                got += data
        except BlockingIOError:
            pass
        theirs.close()
        sent = [f[0] for f in FrameDecoder(pm.MAX_PIPE_FRAME).feed(got)]
        assert pm.JOB not in sent, f"the job went to its worker after its stop: {sent}"
        assert sent == [], f"the worker was sent {sent} for a job it never had"
        assert [s for s, _ in rt.finished] == [CANCELLED] and rt.cancelled == ["stop it"]
        assert took < grace / 2, f"the terminal came after {took:.2f} s: the stop waited for the grace"
        assert handle.exited.done() and _killed(handle.exited.result())
    asyncio.run(go())
