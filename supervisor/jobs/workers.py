"""Worker processes: the fork server, one handle per worker, and the warm pool.

The supervisor never runs agent code. It starts one fork server (`python -m
worker`) that has imported the worker runtime once; every worker is a fork of
it, made ahead of need and kept idle in a small pool, so that a job start
costs a pipe write, not an interpreter start. Each worker has its own session
and process group. Its exit status reaches us from the fork server, which
reaps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import msgpack

from shared import pipe_messages as pm
from shared.exit_codes import describe_wait_status
from supervisor.sandbox.cgroups import Cgroups, WorkerCgroup
from supervisor.egress.proxy import EgressListener
from supervisor.logs import OutputRelay

log = logging.getLogger("arcp.workers")

MAX_PACKET = 64 * 1024
SPAWN_TIMEOUT = 10.0
MAX_SPAWNS_IN_FLIGHT = 16
CGROUP_LINGER = 0.5  # seconds a dead worker's cgroup is kept for its job to read
LEFTOVER_WAIT, LEFTOVER_WAIT_STEPS = 0.5, 50  # for killed leftovers to leave a kept worker's cgroup


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

    async def stop(self, grace: float) -> None:
        """SIGTERM, wait `grace`, SIGKILL, wait (bounded); close the pipe."""
        if self.alive:
            self.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), grace)
        await self.kill()

    async def kill(self, wait: float = 2.0) -> None:
        self.signal(signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.exited), wait)
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


class ForkServer:
    """The supervisor's client of `python -m worker`."""

    def __init__(self, env: dict[str, str], cwd: str, agent_modules: list[str],
                 cgroups: Cgroups | None = None, job_uids: bool = False) -> None:
        self._env = env
        self._want_job_uids = job_uids
        self.job_uids = False  # the fork server kept what workers need to take their job's uid
        self.job_uids_error = ""
        self.opened: list[str] = []  # directories its private mount view opened up for job uids
        self.worker_namespaces: list[str] = []  # namespaces each worker makes of its own ("mnt", "ipc", "net")
        self._cgroups = cgroups
        self.cgroups_to_remove: list[WorkerCgroup] = []
        self._cwd = cwd
        self._modules = agent_modules
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: OutputRelay | None = None
        self._ctl: socket.socket | None = None
        self._next_req = 0
        self._spawning: dict[int, tuple[asyncio.Future[int], socket.socket]] = {}
        self._listening: dict[int, asyncio.Future[tuple[socket.socket, int]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._early_exits: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._in_flight = asyncio.Semaphore(MAX_SPAWNS_IN_FLIGHT)
        self.netns = False
        self.loopback = False  # `lo` is up in the workers' namespace: the egress proxy can listen there
        self.restart = True  # start a new fork server if this one exits (not once the supervisor stops)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()  # its stdout and stderr (and its workers' until their job's are captured)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "worker", str(theirs.fileno()), str(os.getpid()),
                 *(["--job-uids"] if self._want_job_uids else []), *self._modules],
                pass_fds=[theirs.fileno()], cwd=self._cwd, env=self._env,
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w,
            )
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(out_w)
        self._output = OutputRelay(out_r, "arcp.forkserver", self._loop)  # lines -> records of our log
        theirs.close()
        ours.setblocking(False)
        self._ctl = ours
        self._loop.add_reader(ours.fileno(), self._on_control)
        log.debug("fork server started, pid %d", self._proc.pid)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the fork server has imported everything and set up its namespace."""
        assert self._ready is not None
        await asyncio.wait_for(asyncio.shield(self._ready), timeout)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def ready(self) -> bool:
        """Running and ready for spawn requests (not while a restarted one is starting)."""
        return self._ctl is not None and self._ready is not None and self._ready.done()

    def _on_control(self) -> None:
        assert self._ctl is not None
        while True:
            fds: list[int] = []
            try:
                data, fds, _flags, _addr = socket.recv_fds(self._ctl, MAX_PACKET, 1)
            except BlockingIOError:
                return
            except OSError as e:
                data = b""
                log.error("fork server control socket failed: %s", e)
            if not data:
                for fd in fds:
                    os.close(fd)
                self._on_fork_server_gone()
                return
            try:
                msg = msgpack.unpackb(data)
                if msg[0] == "listening" and len(fds) == 1:
                    self._listening_reply(msg, fds.pop())
                else:
                    self._dispatch(msg)
            except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
                log.error("bad message from the fork server: %s", e)
            finally:
                for fd in fds:
                    os.close(fd)

    def _dispatch(self, msg: list[Any]) -> None:
        op = msg[0]
        if op == "ready":
            facts = msg[1] if isinstance(msg[1], dict) else {}
            self.netns = bool(facts.get("netns"))
            self.loopback = bool(facts.get("loopback"))
            self.job_uids = bool(facts.get("job_uids"))
            self.job_uids_error = str(facts.get("job_uids_error") or "")
            opened = facts.get("opened")
            self.opened = [str(d) for d in opened] if isinstance(opened, list) else []
            spaces = facts.get("worker_namespaces")
            self.worker_namespaces = [str(n) for n in spaces] if isinstance(spaces, list) else []
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif op == "spawned":
            entry = self._spawning.pop(msg[1], None)
            if entry and not entry[0].done():
                entry[0].set_result(int(msg[2]))
        elif op == "spawn_failed":
            entry = self._spawning.pop(msg[1], None)
            if entry and not entry[0].done():
                entry[0].set_exception(WorkerSpawnError(str(msg[2])))
        elif op == "listen_failed":
            waiter = self._listening.pop(msg[1], None)
            if waiter and not waiter.done():
                waiter.set_exception(OSError(str(msg[2])))
        elif op == "exited":
            pid, status = int(msg[1]), int(msg[2])
            fut = self._exits.pop(pid, None)
            if fut is None:
                self._early_exits[pid] = status
            elif not fut.done():
                fut.set_result(status)

    def _listening_reply(self, msg: list[Any], fd: int) -> None:
        sock = socket.socket(fileno=fd)
        waiter = self._listening.pop(msg[1], None)
        if waiter is None or waiter.done():
            sock.close()
            return
        sock.setblocking(False)
        waiter.set_result((sock, int(msg[2])))

    async def listen(self, pid: int = 0) -> tuple[socket.socket, int]:
        """A listening socket on the loopback of worker `pid`'s network namespace (of the
        fork server's, shared by the workers, where they have none of their own), and its port."""
        if self._ctl is None or not self.loopback:
            raise OSError("the workers' network namespace has no loopback")
        assert self._loop is not None
        self._next_req += 1
        req = self._next_req
        fut: asyncio.Future[tuple[socket.socket, int]] = self._loop.create_future()
        self._listening[req] = fut
        try:
            await self._send_request(msgpack.packb(["listen", req, pid]), [])
            return await asyncio.wait_for(fut, SPAWN_TIMEOUT)
        except (OSError, TimeoutError, WorkerSpawnError) as e:
            self._listening.pop(req, None)
            raise OSError(f"the fork server did not open a port: {e or type(e).__name__}") from e

    def _on_fork_server_gone(self) -> None:
        assert self._loop is not None and self._ctl is not None
        self._loop.remove_reader(self._ctl.fileno())
        self._ctl.close()
        self._ctl = None
        status = self._proc.wait() if self._proc else -1
        why = f"exited with status {status}" if status >= 0 else f"killed by signal {-status}"
        if self.restart:
            log.error("the fork server exited (%s); starting a new one", why)
        else:
            log.info("the fork server exited (%s) while the supervisor stops: not restarted", why)
        for fut, _ in self._spawning.values():
            if not fut.done():
                fut.set_exception(WorkerSpawnError("the fork server exited"))
        self._spawning.clear()
        for waiter in self._listening.values():
            if not waiter.done():
                waiter.set_exception(OSError("the fork server exited"))
        self._listening.clear()
        # Workers of the old fork server died with it (parent-death signal).
        for fut in self._exits.values():
            if not fut.done():
                fut.set_result(signal.SIGKILL)
        self._exits.clear()
        if self.restart:
            self.start()

    async def spawn(self, reuse: int) -> WorkerHandle:
        async with self._in_flight:  # the fork server forks one at a time: don't flood its socket
            return await self._spawn(reuse)

    async def _send_request(self, data: bytes, fds: list[int]) -> None:
        """Send one request with its descriptors, waiting while the socket buffer is full."""
        assert self._loop is not None
        while True:
            ctl = self._ctl
            if ctl is None:
                raise WorkerSpawnError("the fork server is gone")
            try:
                socket.send_fds(ctl, [data], fds)
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = self._loop.create_future()

                def ready(fut: asyncio.Future[None] = writable) -> None:
                    if not fut.done():
                        fut.set_result(None)

                self._loop.add_writer(ctl.fileno(), ready)
                try:
                    await asyncio.wait_for(writable, SPAWN_TIMEOUT)
                finally:
                    self._loop.remove_writer(ctl.fileno())

    async def _spawn(self, reuse: int) -> WorkerHandle:
        if self._ctl is None:
            raise WorkerSpawnError("no fork server")
        assert self._loop is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._next_req += 1
        req = self._next_req
        fut: asyncio.Future[int] = self._loop.create_future()
        self._spawning[req] = (fut, ours)
        # The worker joins its group itself, first thing after fork (it fails closed if it
        # cannot): no cgroup.procs write on the event loop, and never a job outside its group.
        cgroup = self._cgroups.reserve() if self._cgroups is not None else None
        procs = cgroup.procs_files() if cgroup is not None else []
        try:
            await self._send_request(msgpack.packb(["spawn", req, reuse, procs]), [theirs.fileno()])
        except (OSError, TimeoutError, WorkerSpawnError) as e:
            self._spawning.pop(req, None)
            ours.close()
            if cgroup is not None and self._cgroups is not None:
                self._cgroups.unreserve(cgroup)
            raise WorkerSpawnError(f"cannot reach the fork server: {e}") from e
        finally:
            theirs.close()
        try:
            pid = await asyncio.wait_for(fut, SPAWN_TIMEOUT)
        except BaseException:
            ours.close()
            if cgroup is not None:  # a late fork may still join it: empty it before reuse
                self.cgroups_to_remove.append(cgroup)
            raise
        exited: asyncio.Future[int] = self._loop.create_future()
        early = self._early_exits.pop(pid, None)
        if early is not None:
            exited.set_result(early)
        else:
            self._exits[pid] = exited
        if cgroup is not None:
            exited.add_done_callback(lambda _: self._release_cgroup(cgroup))
        handle = WorkerHandle(pid, ours, exited, cgroup)
        await handle.open()
        return handle

    def _release_cgroup(self, cgroup: WorkerCgroup) -> None:
        """The worker is gone: end whatever it left in its group now; hand the group to the
        next worker a little later, once its job has read why the worker died (an OOM kill)."""
        cgroup.kill_all()
        assert self._loop is not None
        self._loop.call_later(CGROUP_LINGER, self._recycle_cgroup, cgroup)

    def _recycle_cgroup(self, cgroup: WorkerCgroup) -> None:
        assert self._cgroups is not None
        if not self._cgroups.recycle(cgroup):
            self.cgroups_to_remove.append(cgroup)

    def sweep_cgroups(self) -> None:
        """Retry groups that still had (dying) tasks."""
        pending, self.cgroups_to_remove = self.cgroups_to_remove, []
        for cg in pending:
            self._recycle_cgroup(cg)

    def close(self) -> None:
        if self._ctl is not None and self._loop is not None:
            self._loop.remove_reader(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._output is not None:
            self._output.close()


class WorkerPool:
    """Warm workers ready before they are needed; reuse only within one key."""

    def __init__(self, fork_server: ForkServer, warm: int, reuse: int, max_idle_reused: int = 32,
                 on_spawn: Callable[[WorkerHandle], None] | None = None,
                 on_keep: Callable[[WorkerHandle], None] | None = None) -> None:
        """`on_spawn` prepares each new worker (its temp dir) before it waits in the pool;
        `on_keep` resets a worker kept for another job of its key."""
        self._fs = fork_server
        self._on_spawn = on_spawn
        self._on_keep = on_keep
        self._warm = max(0, warm)
        self._reuse = max(1, reuse)
        self._max_idle_reused = max_idle_reused
        self._fresh: deque[WorkerHandle] = deque()
        self._reused: dict[Hashable, deque[WorkerHandle]] = {}
        self._reused_count = 0
        self._refilling = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        self._refill()

    @property
    def idle(self) -> int:
        """Workers waiting for a job: fresh ones, and those kept for another job of their key."""
        return len(self._fresh) + self._reused_count

    async def acquire(self, key: Hashable) -> WorkerHandle:
        if self._reuse > 1:
            idle = self._reused.get(key)
            while idle:
                h = idle.popleft()
                self._reused_count -= 1
                if not h.alive:
                    h.close_pipe()
                elif await self._alone(h):
                    return h
                else:
                    self.retire(h)
        while self._fresh:
            h = self._fresh.popleft()
            self._refill()
            if h.alive:
                return h
            h.close_pipe()
        self._refill()
        return self._prepared(await self._fs.spawn(self._reuse))

    def _prepared(self, h: WorkerHandle) -> WorkerHandle:
        if self._on_spawn is not None:
            try:
                self._on_spawn(h)
            except OSError as e:
                self.retire(h)
                raise WorkerSpawnError(f"cannot prepare worker {h.pid}: {e}") from e
        return h

    def release(self, handle: WorkerHandle, key: Hashable, left: Sequence[str] = ()) -> None:
        """A job ended normally on `handle`: keep it for `key` or retire it.

        Kept, it is cleared of what its job left: every other process of its cgroup is
        killed. It is retired instead if the job left something in the worker itself (`left`,
        the worker's word: a thread, a child process, a changed sys.modules; or more threads
        than an idle worker has, the kernel's word), or if it has no cgroup in which to find
        what the job left."""
        handle.jobs_run += 1
        if self._reuse > 1 and not self._closed and handle.alive and handle.jobs_run < self._reuse:
            left = list(left)
            threads = handle.thread_count()
            if threads is not None and threads > pm.IDLE_THREADS and pm.LEFT_THREAD not in left:
                left.append(pm.LEFT_THREAD)
            if handle.cgroup is None:
                left.append("no cgroup to search")
            if left:
                log.info("worker %d not reused: its job left %s", handle.pid, ", ".join(left))
                self.retire(handle)
                return
            assert handle.cgroup is not None
            killed = handle.cgroup.kill_others(handle.pid)
            if killed:
                log.info("worker %d: killed %d processes its job left (%s)", handle.pid, len(killed),
                         " ".join(map(str, killed)))
            if self._reused_count >= self._max_idle_reused:
                self._evict_one()
            if self._on_keep is not None:
                self._on_keep(handle)
            self._reused.setdefault(key, deque()).append(handle)
            self._reused_count += 1
            return
        self.retire(handle)

    async def _alone(self, h: WorkerHandle) -> bool:
        """Is a kept worker alone in its cgroup (what its last job left is gone)? Kills
        stragglers and waits for them a little; False if some remain."""
        cg = h.cgroup
        if cg is None:
            return False
        try:
            for _ in range(LEFTOVER_WAIT_STEPS):
                if not any(pid != h.pid for pid in cg.pids(strict=True)):
                    return True
                cg.kill_others(h.pid)
                await asyncio.sleep(LEFTOVER_WAIT / LEFTOVER_WAIT_STEPS)
        except OSError as e:
            log.warning("worker %d not reused: %s", h.pid, e)
            return False
        log.warning("worker %d not reused: processes its last job left outlived SIGKILL", h.pid)
        return False

    def retire(self, handle: WorkerHandle) -> None:
        """End a worker now (its job is over): kill its group, close its pipe."""
        handle.signal(signal.SIGKILL)
        handle.close_pipe()

    def _evict_one(self) -> None:
        for key, idle in self._reused.items():
            if idle:
                self.retire(idle.popleft())
                self._reused_count -= 1
                if not idle:
                    del self._reused[key]
                return

    def _refill(self) -> None:
        if self._closed:
            return
        while len(self._fresh) + self._refilling < self._warm:
            self._refilling += 1
            task = asyncio.get_running_loop().create_task(self._spawn_one())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _spawn_one(self) -> None:
        try:
            h = self._prepared(await self._fs.spawn(self._reuse))
        except (WorkerSpawnError, TimeoutError, OSError) as e:
            log.error("could not start a warm worker: %s", e)
            return
        finally:
            self._refilling -= 1
        if self._closed:
            self.retire(h)
        else:
            self._fresh.append(h)

    def close(self) -> None:
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for h in self._fresh:
            self.retire(h)
        self._fresh.clear()
        for idle in self._reused.values():
            for h in idle:
                self.retire(h)
        self._reused.clear()
