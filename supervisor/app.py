"""Start the runtime and a transport; print the readiness line; shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import signal
import sys

from supervisor.agent_check import check_agents
from supervisor.config import Config, ConfigError
from supervisor.runtime import STDIO_FRAME_CAP, WS_FRAME_CAP, Runtime

log = logging.getLogger("arcp")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def raise_open_files_limit() -> None:
    """Sessions, worker pipes and proxied connections all hold descriptors: use the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(config: Config) -> None:
    from supervisor.doctor import report

    raise_open_files_limit()

    for line in report(as_json=False, job_uids=config.job_uids)[0].splitlines():
        if line:
            log.info("isolation: %s", line)
    rt = Runtime(config, STDIO_FRAME_CAP if config.stdio else WS_FRAME_CAP)
    await rt.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        problems = await check_agents(rt)
        if problems:
            raise ConfigError("; ".join(problems))
        if config.stdio:
            from supervisor.transport_stdio import serve_stdio

            session = asyncio.create_task(serve_stdio(rt))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            session.cancel()
            with contextlib.suppress(BaseException):
                await session
        else:
            from supervisor.transport_ws import start_ws

            try:
                server = await start_ws(rt)
            except OSError as e:
                why = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                raise ConfigError(f"cannot listen on {_url_host(config.host)}:{config.port}: {why}") from None
            port = next(iter(server.sockets)).getsockname()[1]
            print(f"arcp-supervisor listening on ws://{_url_host(config.host)}:{port}{config.path}", flush=True)
            await stop.wait()
            server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), config.grace + 2)
    finally:
        await rt.close()


def run(config: Config) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
