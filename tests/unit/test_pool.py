"""The worker pool owns its tasks: once it is closed, none of them is left running."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import anyio

from supervisor.jobs.fork_server import ForkServer
from supervisor.jobs.pool import WorkerPool
from supervisor.jobs.worker_handle import WorkerHandle

SETTLE = 2.0  # seconds the tasks of a closed pool may take to end


async def _others_end(within: float = SETTLE) -> set[asyncio.Task[Any]]:
    """The tasks other than this one still running after `within` seconds (or fewer, once none is)."""
    me = asyncio.current_task()
    deadline = asyncio.get_running_loop().time() + within
    while True:
        others = {t for t in asyncio.all_tasks() if t is not me and not t.done()}
        if not others or asyncio.get_running_loop().time() > deadline:
            return others
        await asyncio.sleep(0.01)


class _StuckForkServer:
    """A fork server whose first `ready` spawns answer at once and whose later ones never do."""

    def __init__(self, ready: int) -> None:
        self.ready = ready
        self.spawned: list[WorkerHandle] = []
        self.served = self.cancelled = 0

    async def spawn(self, reuse: int) -> WorkerHandle:
        if self.ready <= 0:
            try:
                await anyio.sleep_forever()
            finally:
                self.cancelled += 1
        self.ready -= 1
        ours, theirs = socket.socketpair()
        theirs.close()
        h = WorkerHandle(100000 + len(self.spawned), ours, asyncio.get_running_loop().create_future())
        self.spawned.append(h)
        return h

    async def serve(self) -> None:
        self.served += 1
        await anyio.sleep_forever()


def _fake_pool(ready: int, warm: int) -> tuple[WorkerPool, _StuckForkServer]:
    fs = _StuckForkServer(ready)
    return WorkerPool(fs, warm=warm, reuse=1), fs  # type: ignore[arg-type]


def test_closing_a_running_pool_cancels_its_spawns_and_leaves_no_task() -> None:
    async def go() -> None:
        pool, fs = _fake_pool(ready=2, warm=4)
        with anyio.fail_after(SETTLE):  # run() ends once the pool is closed
            async with anyio.create_task_group() as tg:
                await tg.start(pool.run)
                await anyio.sleep(0.05)
                assert pool.idle == 2 and fs.served == 1  # two warm, two spawns in flight, the clean-up running
                pool.close()
        assert fs.cancelled == 2
        assert all(h.sock.fileno() == -1 for h in fs.spawned), "a warm worker was left open"
        assert pool.idle == 0
        assert await _others_end(0.0) == set()  # the group has waited for them all
    asyncio.run(go())


def test_a_real_fork_servers_pool_leaves_no_task_and_no_process_after_close() -> None:
    async def go() -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1"}
        fs = ForkServer(env, os.getcwd(), [], None)
        fs.start()
        try:
            await fs.wait_ready()
            pool = WorkerPool(fs, warm=2, reuse=1)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    await tg.start(pool.run)
                    while pool.idle < 2:
                        await anyio.sleep(0.01)
                    worker = await pool.acquire("k")  # one warm worker taken: another is spawned
                    pool.retire(worker)
                    pool.close()
            assert await _others_end() == set()
        finally:
            await fs.aclose()
        assert fs.pid is not None and not os.path.exists(f"/proc/{fs.pid}"), "the fork server was not reaped"
    asyncio.run(go())
