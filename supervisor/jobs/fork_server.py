"""The fork server: the supervisor's client of `worker/__main__.py`, one per agent environment.

The supervisor never runs agent code. It starts one fork server that has imported the
worker runtime once; every worker is a fork of it, so that a worker costs a pipe write,
not an interpreter start. The fork server reaps its workers and reports their exits.

Nothing here blocks the event loop but a fork server's exec (a few ms: it must run on the
loop's own thread, see `astart()`): its exit is seen through a pidfd (its reaping is then
immediate; `close()`, for the end of the loop, is the exception), and every change to the
workers' cgroups runs on a thread (worker_groups.py). That background work belongs to `serve()`, which the worker pool
runs (pool.py) for as long as it runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

import anyio
import msgpack
from anyio.abc import TaskGroup

from supervisor.jobs.worker_groups import WorkerGroups
from supervisor.jobs.worker_handle import WorkerHandle, WorkerSpawnError
from supervisor.logs import OutputRelay
from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.worker_runtime import WorkerRuntime

log = logging.getLogger("arcp.workers")

MAX_PACKET = 64 * 1024
SPAWN_TIMEOUT = 10.0
MAX_SPAWNS_IN_FLIGHT = 16

Launched = tuple["subprocess.Popen[bytes]", socket.socket, int]  # the process, our control end, its output


class ForkServerStartError(WorkerSpawnError):
    """The fork server exited, or did not say it was ready, before serving; the message
    says why, with the last lines it wrote."""


class ForkServer:
    def __init__(self, env: dict[str, str], cwd: str, agent_modules: list[str],
                 cgroups: Cgroups | None = None, job_uids: bool = False, *,
                 python: str | None = None, import_path: tuple[str, ...] = (), runtime: str | None = None,
                 hide: list[str] | None = None, label: str = "") -> None:
        """`python`: the agent environment's interpreter (None: the supervisor's, without
        its site-packages); `import_path`: the environment's import directories; `runtime`:
        the worker runtime's copy (worker_runtime.py; None: one of its own, removed at
        close); `hide`: directories of installed packages its jobs must not see."""
        self._env = env
        self.python = python
        self.label = label or (python or "the supervisor's interpreter")
        self._import_path = list(import_path)
        self.runtime_dir = runtime
        self._own_runtime: WorkerRuntime | None = None
        self._hide = hide
        self.hidden: list[str] = []  # package directories its jobs cannot see
        self.not_hidden: list[str] = []  # those it could not hide (hide_error says why)
        self.hide_error = ""
        self.python_version = ""
        self.fast_json = True
        self.seccomp = False  # it built the seccomp filter its workers load
        self._want_job_uids = job_uids
        self.job_uids = False  # the fork server kept what workers need to take their job's uid
        self.job_uids_error = ""
        self.opened: list[str] = []  # directories its private mount view opened up for job uids
        self.worker_namespaces: list[str] = []  # namespaces each worker makes of its own ("mnt", "ipc", "net")
        self._groups = WorkerGroups(cgroups)
        self._cwd = cwd
        self._modules = agent_modules
        self._proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None  # readable once the fork server has exited
        self._output: OutputRelay | None = None
        self._ctl: socket.socket | None = None
        self._writable: asyncio.Future[None] | None = None  # the control socket has room again
        self._next_req = 0
        self._spawning: dict[int, tuple[asyncio.Future[int], socket.socket]] = {}
        self._listening: dict[int, asyncio.Future[tuple[socket.socket, int]]] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._early_exits: dict[int, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[None] | None = None
        self._reaped = anyio.Event()
        self._in_flight = asyncio.Semaphore(MAX_SPAWNS_IN_FLIGHT)
        self._tg: TaskGroup | None = None  # serve()'s, while it runs
        self._closed = False
        self.netns = False
        self.loopback = False  # `lo` is up in the workers' namespace: the egress proxy can listen there
        self.restart = True  # start a new fork server if this one exits (not once the supervisor stops)

    # -- start, exit, close -------------------------------------------------------------
    def start(self) -> None:
        """Start the fork server (its exec blocks the loop for a few ms: at start-up, at a
        restart, and when an agent environment added by a reload is first used)."""
        self._attach(*self._launch())

    async def astart(self) -> None:
        """`start()` from a task. The exec runs on the event loop's own thread, never on a
        worker thread: the fork server's parent-death signal fires when the *thread* that
        started it exits, and a worker thread of anyio's ends once it has been idle a while
        (the fork server, and every worker with it, would be killed then)."""
        self.start()

    def _launch(self) -> Launched:
        if self.runtime_dir is None:
            self._own_runtime = WorkerRuntime()
            self.runtime_dir = self._own_runtime.build()
        options = {"modules": self._modules, "job_uids": self._want_job_uids, "path": self._import_path,
                   "runtime": self.runtime_dir, "own_prefix": self.python is not None, "hide": self._hide}
        # -I: no PYTHON* variables, no user site, no current directory on the path; -S: no
        # site-packages, so nothing of an agent's venv (its .pth files, a sitecustomize) runs in
        # the fork server, which is not sandboxed: its jobs get the venv's packages on their own
        # import path (worker/import_path.py)
        interpreter = [self.python or sys.executable, "-I", "-S"]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()  # its stdout and stderr (and its workers' until their job's are captured)
        try:
            proc = subprocess.Popen(
                [*interpreter, os.path.join(self.runtime_dir, "worker", "__main__.py"), str(theirs.fileno()),
                 str(os.getpid()), json.dumps(options)],
                pass_fds=[theirs.fileno()], cwd=self._cwd, env=self._env,
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=out_w,
            )
        except BaseException:
            os.close(out_r)
            ours.close()
            raise
        finally:
            os.close(out_w)
            theirs.close()
        return proc, ours, out_r

    def _attach(self, proc: subprocess.Popen[bytes], ours: socket.socket, out_r: int) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._reaped = anyio.Event()
        self._proc = proc
        self._output = OutputRelay(out_r, "arcp.forkserver", loop)  # lines -> records of our log
        ours.setblocking(False)
        self._ctl = ours
        loop.add_reader(ours.fileno(), self._on_control)
        self._pidfd = os.pidfd_open(proc.pid)
        loop.add_reader(self._pidfd, self._on_exit)
        log.debug("fork server started, pid %d", proc.pid)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the fork server has imported everything and set up its namespace;
        ForkServerStartError if it exits first or takes longer than `timeout`."""
        assert self._ready is not None
        try:
            with anyio.fail_after(timeout):
                await asyncio.shield(self._ready)
        except TimeoutError:
            raise ForkServerStartError(f"its fork server was not ready after {timeout:.0f} s"
                                       + self._last_words()) from None

    def _last_words(self) -> str:
        lines = list(self._output.last_lines) if self._output is not None else []
        return f" (it said: {' | '.join(lines)})" if lines else ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def ready(self) -> bool:
        """Running and ready for spawn requests (not while a restarted one is starting)."""
        return self._ctl is not None and self._ready is not None and self._ready.done()

    def _on_control_closed(self) -> None:
        """The control socket closed (the fork server is exiting): fail whatever waits on it."""
        assert self._loop is not None and self._ctl is not None
        self._loop.remove_reader(self._ctl.fileno())
        self._loop.remove_writer(self._ctl.fileno())
        self._ctl.close()
        self._ctl = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)  # its waiters find the socket gone
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

    def _on_exit(self) -> None:
        """The fork server has exited (its pidfd is readable): it is reaped at once, what it
        said before is read, and a new one started unless the supervisor stops."""
        assert self._proc is not None
        self._forget_pidfd()
        if self._ctl is not None:
            self._on_control()  # to the end of what it sent
        if self._ctl is not None:
            self._on_control_closed()  # a descendant still holds its end: gone all the same
        status = self._proc.wait()  # a zombie now: no wait
        self._reaped.set()
        if self._closed:
            return
        why = f"exited with status {status}" if status >= 0 else f"killed by signal {-status}"
        if self._ready is not None and not self._ready.done():  # never served: no restart loop
            if self._output is not None:
                self._output.flush()
            self._ready.set_exception(ForkServerStartError(
                f"its fork server {why} before it was ready{self._last_words()}"))
            self._ready.exception()  # retrieved: wait_ready() raises it
            return
        if not self.restart:
            log.info("the fork server exited (%s) while the supervisor stops: not restarted", why)
            return
        log.error("the fork server exited (%s); starting a new one", why)
        if self._tg is not None:
            self._tg.start_soon(self._restart)
        else:
            self.start()

    async def _restart(self) -> None:
        self.start()  # on the loop's thread, as astart() says why
        if self._closed:
            await self.aclose()

    def _forget_pidfd(self) -> None:
        if self._pidfd is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def close(self) -> None:
        """Stop the fork server: SIGKILL (its workers die with it), and reap it, which waits
        for the kernel to tear it down (3 ms here): for the end of the loop's life. From a
        task, `aclose()` does the same without blocking the loop."""
        self._kill()
        if self._proc is not None:
            self._proc.wait()
        self._forget_pidfd()
        self._reaped.set()

    async def aclose(self, timeout: float = 5.0) -> None:
        """Stop the fork server and wait until it is reaped (at most `timeout` seconds), the
        loop free meanwhile: its pidfd tells when it has exited (`_on_exit`)."""
        self._kill()
        if self._pidfd is not None:
            with anyio.move_on_after(timeout):
                await self._reaped.wait()

    def _kill(self) -> None:
        self._closed = True
        if self._ctl is not None and self._loop is not None:
            self._loop.remove_reader(self._ctl.fileno())
            self._loop.remove_writer(self._ctl.fileno())
            self._ctl.close()
            self._ctl = None
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
        if self._output is not None:
            self._output.close()
        if self._own_runtime is not None:
            self._own_runtime.close()

    # -- its messages ---------------------------------------------------------------------
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
                self._on_control_closed()
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
            hidden = facts.get("hidden")
            self.hidden = [str(d) for d in hidden] if isinstance(hidden, list) else []
            self.hide_error = str(facts.get("hide_error") or "")
            not_hidden = facts.get("not_hidden")
            self.not_hidden = [str(d) for d in not_hidden] if isinstance(not_hidden, list) else []
            self.python_version = str(facts.get("python") or "")
            self.fast_json = bool(facts.get("fast_json", True))
            self.seccomp = bool(facts.get("seccomp"))
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

    # -- requests ---------------------------------------------------------------------------
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
            with anyio.fail_after(SPAWN_TIMEOUT):
                return await fut
        except (OSError, TimeoutError, WorkerSpawnError) as e:
            self._listening.pop(req, None)
            raise OSError(f"the fork server did not open a port: {e or type(e).__name__}") from e

    async def spawn(self, reuse: int) -> WorkerHandle:
        async with self._in_flight:  # the fork server forks one at a time: don't flood its socket
            return await self._spawn(reuse)

    async def _send_request(self, data: bytes, fds: list[int]) -> None:
        """Send one request with its descriptors, waiting (SPAWN_TIMEOUT at most) while the
        socket buffer is full."""
        with anyio.fail_after(SPAWN_TIMEOUT):
            while True:
                ctl = self._ctl
                if ctl is None:
                    raise WorkerSpawnError("the fork server is gone")
                try:
                    socket.send_fds(ctl, [data], fds)
                    return
                except BlockingIOError:
                    await asyncio.shield(self._until_writable(ctl))

    def _until_writable(self, ctl: socket.socket) -> asyncio.Future[None]:
        """One future for every sender waiting for room in the control socket."""
        assert self._loop is not None
        fut = self._writable
        if fut is None or fut.done():
            loop = self._loop
            fut = self._writable = loop.create_future()

            def ready(fut: asyncio.Future[None] = fut) -> None:
                loop.remove_writer(ctl.fileno())
                if not fut.done():
                    fut.set_result(None)

            loop.add_writer(ctl.fileno(), ready)
        return fut

    async def _spawn(self, reuse: int) -> WorkerHandle:
        if self._ctl is None:
            raise WorkerSpawnError("no fork server")
        assert self._loop is not None
        # The worker joins its group itself, first thing after fork (it fails closed if it
        # cannot): no cgroup.procs write on the event loop, and never a job outside its group.
        cgroup = await self._groups.reserve()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._next_req += 1
        req = self._next_req
        fut: asyncio.Future[int] = self._loop.create_future()
        self._spawning[req] = (fut, ours)
        procs = cgroup.procs_files() if cgroup is not None else []
        try:
            await self._send_request(msgpack.packb(["spawn", req, reuse, procs]), [theirs.fileno()])
        except BaseException as e:  # not sent (a cancel too): the group goes back
            self._spawning.pop(req, None)
            ours.close()
            self._groups.unreserve(cgroup)
            if isinstance(e, (OSError, TimeoutError, WorkerSpawnError)):
                raise WorkerSpawnError(f"cannot reach the fork server: {e}") from e
            raise
        finally:
            theirs.close()
        try:
            with anyio.fail_after(SPAWN_TIMEOUT):
                pid = await fut
        except BaseException:
            self._spawning.pop(req, None)
            ours.close()
            self._groups.lost(cgroup)
            raise
        exited: asyncio.Future[int] = self._loop.create_future()
        early = self._early_exits.pop(pid, None)
        if early is not None:
            exited.set_result(early)
        else:
            self._exits[pid] = exited
        if cgroup is not None:
            exited.add_done_callback(lambda _: self._groups.released(cgroup))
        handle = WorkerHandle(pid, ours, exited, cgroup)
        try:
            await handle.open()
        except BaseException:
            handle.signal(signal.SIGKILL)
            handle.close_pipe()
            raise
        return handle

    # -- background work ---------------------------------------------------------------------
    def sweep_cgroups(self) -> None:
        """Retry the workers' groups that still had (dying) tasks (WorkerGroups.sweep)."""
        self._groups.sweep()

    async def serve(self) -> None:
        """The fork server's background work, until cancelled: dead workers' cgroups released
        (WorkerGroups.serve), a fork server that exited replaced. The worker pool runs it
        (`WorkerPool.run`)."""
        if self._tg is not None:
            raise RuntimeError("ForkServer.serve() is already running")
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                tg.start_soon(self._groups.serve, name="worker cgroups")
                await anyio.sleep_forever()
            finally:
                self._tg = None
