"""One worker process and the supervisor's end of its pipe, and the one way a worker is ended.

Every worker is a fork of the fork server (fork_server.py), with its own session and
process group. Its exit status reaches us from the fork server, which reaps it: the
handle's `exited` future holds it. Ending a worker is one escalation, `stop()`: time to
end on its own, then SIGTERM, then SIGKILL (its whole cgroup too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable

import anyio

from shared.exit_codes import describe_wait_status
from supervisor.egress.proxy import EgressListener
from supervisor.sandbox.worker_cgroup import WorkerCgroup

log = logging.getLogger("arcp.workers")

CGROUP_LINGER = 0.5  # seconds a dead worker's cgroup is kept for its job to read
KILL_SLACK = 0.2  # between SIGTERM and SIGKILL
EXIT_WAIT = 0.25  # after SIGKILL, for the reaper's word


class WorkerSpawnError(Exception):
    pass


class WorkerHandle:
    """One worker process and the supervisor's end of its pipe."""

    def __init__(self, pid: int, sock: socket.socket, exited: asyncio.Future[int],
                 cgroup: WorkerCgroup | None = None) -> None:
        self.pid = pid
        self.sock = sock
        self.exited = exited
        self.cgroup = cgroup
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.jobs_run = 0
        self.egress: EgressListener | None = None  # its jobs' proxy port, opened for the first net.fetch job
        self.uid: int | None = None  # the uid its jobs run as (job uids on), taken at its first job
        self.tmp_dir: str | None = None  # its jobs' HOME/TMPDIR (see job_dirs), emptied between jobs
        self.tmp_capped = False
        self.tmp_size = 0
        self.on_close: list[Callable[[], None]] = []  # run once, when its pipe is closed

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(sock=self.sock, limit=1 << 20)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def signal(self, sig: int) -> None:
        """Signal the worker's process group (never a pid that was already reaped).

        SIGKILL also reaches every task of the worker's cgroup, which includes
        descendants that left the process group with setsid(). Once the worker is gone
        its group is emptied at its exit and may pass to another worker: not touched here.
        """
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            if sig == signal.SIGKILL and self.cgroup is not None:
                self.cgroup.kill_all()

    def thread_count(self) -> int | None:
        """The worker's threads as the kernel counts them (None when it cannot be told)."""
        if self.exited.done():
            return None
        try:
            return len(os.listdir(f"/proc/{self.pid}/task"))
        except OSError:
            return None

    def exit_reason(self) -> str:
        if not self.exited.done():
            return "still running"
        return describe_wait_status(self.exited.result())

    async def wait_exit(self) -> None:
        """Until the fork server has reaped the worker (a cancelled wait leaves `exited` be)."""
        await asyncio.shield(self.exited)

    async def stop(self, grace: float, ended: asyncio.Event | None = None, kill_wait: float = EXIT_WAIT) -> None:
        """End the worker: `grace` seconds to end on its own (until it exits, or until `ended`
        is set: its job has ended), then SIGTERM to its process group and KILL_SLACK seconds,
        then `kill()`. Never longer than grace + KILL_SLACK + `kill_wait`."""
        with anyio.move_on_after(grace):
            if ended is None:
                await self.wait_exit()
            else:
                await ended.wait()
        if self.alive and not (ended is not None and ended.is_set()):
            self.signal(signal.SIGTERM)
            with anyio.move_on_after(KILL_SLACK):
                await self.wait_exit()
        await self.kill(kill_wait)

    async def kill(self, wait: float = 2.0) -> None:
        """SIGKILL (its process group and its cgroup), up to `wait` seconds for the reaper's
        word, and the pipe closed (also when the wait is cancelled)."""
        self.signal(signal.SIGKILL)
        try:
            with anyio.move_on_after(wait):
                await self.wait_exit()
        finally:
            self.close_pipe()

    def close_pipe(self) -> None:
        hooks, self.on_close = self.on_close, []
        for hook in hooks:
            try:
                hook()
            except OSError as e:
                log.warning("worker %d: clean-up failed: %s", self.pid, e)
        if self.egress is not None:
            self.egress.close()
            self.egress = None
        if self.writer is not None:
            self.writer.close()
        else:
            self.sock.close()
