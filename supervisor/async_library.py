"""Tell anyio, through sniffio where that is installed, that the runtime runs on asyncio.

anyio (4.12 and later) asks sniffio which async library runs whenever sniffio can be
imported, and sniffio answers "asyncio" only inside a task. The runtime also starts tasks
from the event loop's own callbacks (a job's timeout timer, a dead worker's report, an
accepted egress connection, a PostgreSQL notification handed over from its listening
thread), where sniffio finds no task: every such start_soon raised "Not currently running
on any asynchronous event loop", so a job's max_runtime_sec, its lease's expiry or the
runtime ceiling never ended it. sniffio is installed beside many libraries, so this is not
rare. Its per-thread answer, set in the thread that runs the event loop, holds for every
task and every callback that loop runs, whichever context or thread scheduled it. Whoever
runs a loop for the runtime's parts calls `declare_asyncio()` first: `run`, `doctor` and the
shell client do (and `Runtime` on entry), as do the tests that drive a part on a loop of
their own.
"""

from __future__ import annotations


def declare_asyncio() -> bool:
    """Mark the calling thread (the one running the event loop) as asyncio's for sniffio;
    False when sniffio is absent (anyio then looks for a running asyncio loop itself,
    which callbacks have)."""
    try:
        import sniffio
    except ImportError:
        return False
    sniffio.thread_local.name = "asyncio"
    return True
