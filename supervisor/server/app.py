"""Start the runtime and a transport; print the readiness line; drain and shut down cleanly.

SIGTERM or SIGINT drains: new sessions and submits are refused, running jobs get up to
`drain_timeout` seconds to end, the rest are cancelled, every terminal frame goes out to
the connected clients, then they are told the server is going and closed, and the process
exits 0. A second SIGTERM or SIGINT cancels the running jobs at once. SIGHUP reloads
`--config` (supervisor/reload.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import resource
import signal
from collections.abc import Callable

import anyio

from supervisor.agent_check import check_agents
from supervisor.async_library import declare_asyncio
from supervisor.config import Config, ConfigError
from supervisor.server.connection import SHUTDOWN_DRAIN
from supervisor.logs import configure as configure_logs
from supervisor.reload import Reloader
from supervisor.runtime import STDIO_FRAME_CAP, WS_FRAME_CAP, Runtime

log = logging.getLogger("arcp")
STOP_SLACK = 3.0  # seconds beyond `grace` for cancelled jobs to end and send their terminals


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def raise_open_files_limit() -> None:
    """Sessions, worker pipes and proxied connections all hold descriptors: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


M_ARENA_MAX = -8  # glibc's mallopt parameter
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """glibc gives threads that allocate at once arenas of their own (up to 8 per core), and
    memory freed in one stays in it: the store's writer thread and the worker threads (cgroupfs,
    /proc, mounts) each keep megabytes of a flood's frames. A couple of arenas is enough for
    them. False where the C library has no mallopt (not glibc)."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))


class Stop:
    """SIGTERM/SIGINT: the first asks for a drain, the second for the jobs' end now."""

    def __init__(self) -> None:
        self.drain = anyio.Event()
        self.now = anyio.Event()

    def signalled(self, sig: signal.Signals) -> None:
        if not self.drain.is_set():
            log.info("%s: draining (again to cancel the running jobs at once)", sig.name)
            self.drain.set()
        elif not self.now.is_set():
            log.info("%s again: cancelling the running jobs now", sig.name)
            self.now.set()


async def drain(rt: Runtime, stop: Stop) -> None:
    """Refuse new work, let running jobs end (bounded), cancel the rest, then close every
    connected session once its terminal frames are queued."""
    rt.begin_drain()
    timeout = rt.config.drain_timeout
    running = len(rt.unfinished_jobs())
    if running and not stop.now.is_set():
        log.info("waiting up to %g s for %d running jobs", timeout, running)
        await rt.wait_jobs(timeout, hurry=stop.now)
    left = len(rt.unfinished_jobs())
    if left:
        log.info("cancelling %d jobs", left)
        rt.cancel_jobs("server shutting down")
        if not await rt.wait_jobs(rt.config.grace + STOP_SLACK):
            log.warning("%d jobs had not ended after their cancel", len(rt.unfinished_jobs()))
    n = rt.close_sessions()
    log.info("drained: closing %d connected sessions", n)


async def serve(config: Config, reload: Callable[[], Config] | None = None) -> None:
    from supervisor.doctor import report

    declare_asyncio()  # before any task or callback is made (supervisor/async_library.py)
    raise_open_files_limit()
    if not limit_malloc_arenas():
        log.debug("mallopt is not available: threads keep the C library's default arenas")

    for line in report(as_json=False, job_uids=config.job_uids)[0].splitlines():
        if line:
            log.info("isolation: %s", line)
    stop = Stop()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.signalled, sig)
    async with Runtime(config, STDIO_FRAME_CAP if config.stdio else WS_FRAME_CAP) as rt:
        reloader = Reloader(rt, reload) if reload is not None else None
        loop.add_signal_handler(signal.SIGHUP, reloader.request if reloader is not None else
                                lambda: log.info("SIGHUP: no --config to reload"))
        problems = await check_agents(rt)
        if problems:
            raise ConfigError("; ".join(problems))
        async with anyio.create_task_group() as tg:
            if reloader is not None:
                tg.start_soon(reloader.run)
            if rt.cluster is not None:
                tg.start_soon(_stop_when_fenced, rt, stop)
            if config.stdio:
                await _serve_stdio(rt, stop)
            else:
                await _serve_ws(rt, stop)
            tg.cancel_scope.cancel()
        if rt.cluster is not None and rt.cluster.fenced_by is not None:
            raise NodeFenced(f"node {rt.cluster.node_id} was declared lost by node {rt.cluster.fenced_by} (no "
                             f"heartbeat for more than the node timeout): its jobs were ended there, so it stopped "
                             f"(start it again to serve anew)")


class NodeFenced(Exception):
    """Another process sharing the state database declared this one lost."""


async def _stop_when_fenced(rt: Runtime, stop: Stop) -> None:
    """Declared lost by another node, whose terminals for this node's jobs are already on their
    way: nothing more of this node's may reach a client. Its jobs are stopped at once and its
    clients' transports closed (they resume on another node)."""
    assert rt.cluster is not None
    await rt.cluster.fenced.wait()
    log.error("declared lost by node %s: stopping now", rt.cluster.fenced_by)
    # Its clients go first, with nothing more sent, before its jobs' cancels could reach them:
    # their jobs' terminals (node lost) wait for them on the process they resume on.
    rt.sessions_table.cut_all("declared lost: resume on another process")
    stop.now.set()
    stop.drain.set()


async def _serve_stdio(rt: Runtime, stop: Stop) -> None:
    """One session; it ends when its input has ended and its jobs have (or on a drain)."""
    from supervisor.server.transport_stdio import serve_stdio

    async with anyio.create_task_group() as tg:
        async def session() -> None:
            await serve_stdio(rt)
            tg.cancel_scope.cancel()

        tg.start_soon(session)
        await stop.drain.wait()
        await drain(rt, stop)
        with anyio.move_on_after(SHUTDOWN_DRAIN + STOP_SLACK):
            await anyio.sleep_forever()  # the session ends the group when its last frames are out
        tg.cancel_scope.cancel()


async def _serve_ws(rt: Runtime, stop: Stop) -> None:
    from supervisor.server.transport_ws import start_ws

    config = rt.config
    try:
        server = await start_ws(rt)
    except OSError as e:
        why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise ConfigError(f"cannot listen on {_url_host(config.host)}:{config.port}: {why}") from None
    port = next(iter(server.sockets)).getsockname()[1]
    print(f"arcp-supervisor listening on ws://{_url_host(config.host)}:{port}{config.path}", flush=True)
    try:
        await stop.drain.wait()
        await drain(rt, stop)  # the listener stays open meanwhile: new clients hear why they are refused
    finally:
        server.close(close_connections=False)  # no new connections; each handler writes its last frames
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(SHUTDOWN_DRAIN + STOP_SLACK) as waited:
                await server.wait_closed()
            if waited.cancelled_caught:  # a client that neither reads nor closes, or never said hello
                for conn in list(server.connections):
                    conn.transport.abort()
                with anyio.move_on_after(2.0):
                    await server.wait_closed()


def run(config: Config, reload: Callable[[], Config] | None = None) -> None:
    configure_logs(config.log_format, config.log_level)
    try:
        asyncio.run(serve(config, reload))
    except BaseExceptionGroup as group:  # the task groups' way to raise one error: raise it as itself
        raise _sole(group) from None


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error a group holds (however deeply nested), else the group itself."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        e = stack.pop()
        if isinstance(e, BaseExceptionGroup):
            stack.extend(e.exceptions)
        else:
            leaves.append(e)
    return leaves[0] if len(leaves) == 1 else group
