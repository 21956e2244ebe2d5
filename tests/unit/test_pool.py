"""The worker pool owns its tasks: once it is closed, none of them is left running."""

from __future__ import annotations

import asyncio
import os
import time
import signal
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from shared import pipe_messages as pm
from supervisor.jobs import pool as pool_module
from supervisor.jobs.fork_server import ForkServer
from supervisor.jobs.pool import WorkerPool
from supervisor.jobs.worker_handle import WorkerHandle
from supervisor.sandbox.cgroups import Cgroups
from tests.unit.fake_cgroupfs import FakeCgroupFS

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


# -- a kept worker's checks ---------------------------------------------------------------

class _Kept:
    """A worker on a fake cgroupfs, in a pool that keeps workers, with what the pool asks of
    the kernel recorded: /proc's thread count, the group's processes, kills and signals."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pids_current: str | None) -> None:
        self.fs = FakeCgroupFS(str(tmp_path))
        cg = Cgroups(str(tmp_path), self.fs).reserve()
        assert cg is not None
        self.cg = cg
        self.forks = _StuckForkServer(ready=1)
        self.pool = WorkerPool(self.forks, warm=0, reuse=10)  # type: ignore[arg-type]
        ours, theirs = socket.socketpair()
        theirs.close()
        self.h = WorkerHandle(999_999, ours, asyncio.get_running_loop().create_future(), cgroup=cg)
        self.asked: list[str] = []
        self.set(pids_current, procs=[self.h.pid])
        real_pids = cg.pids

        def pids(strict: bool = False) -> list[int]:
            self.asked.append("cgroup.procs")
            return real_pids(strict)

        def kill_others(keep: int) -> list[int]:
            self.asked.append("kill_others")
            return []

        def thread_count() -> int | None:
            self.asked.append("threads")
            return 2

        monkeypatch.setattr(cg, "pids", pids)
        monkeypatch.setattr(cg, "kill_others", kill_others)
        monkeypatch.setattr(self.h, "thread_count", thread_count)
        monkeypatch.setattr(self.h, "signal", lambda sig: self.asked.append(f"signal {sig}"))

    def set(self, pids_current: str | None, procs: list[int]) -> None:
        if pids_current is not None:
            self.fs._put(os.path.join(self.cg.dirs["pids"], "pids.current"), pids_current)
        self.fs._put(os.path.join(self.cg.dirs["pids"], "cgroup.procs"), "".join(f"{p}\n" for p in procs))


def test_a_clean_worker_is_kept_and_taken_again_on_one_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing left by the worker's word, and no more tasks in its group than an idle worker's
    two threads: kept without a thread count, a kill or a look at the group's processes, and
    taken again for its key the same way."""
    async def go() -> None:
        k = _Kept(tmp_path, monkeypatch, "2")
        await k.pool.release(k.h, "key", [])
        assert k.pool.idle == 1 and k.asked == []
        assert await k.pool.acquire("key") is k.h
        assert k.asked == [] and k.forks.spawned == []
    asyncio.run(go())


def test_more_tasks_than_an_idle_workers_threads_take_the_full_checks(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        k = _Kept(tmp_path, monkeypatch, "3")
        await k.pool.release(k.h, "key", [])
        assert k.pool.idle == 1 and k.asked == ["threads", "kill_others"]
        k.asked.clear()
        assert await k.pool.acquire("key") is k.h  # still 3 by the count: its processes looked at (only the worker)
        assert k.asked == ["cgroup.procs"]
    asyncio.run(go())


def test_without_a_count_the_full_checks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> None:
        k = _Kept(tmp_path, monkeypatch, None)  # no pids.current: no pids controller
        await k.pool.release(k.h, "key", [])
        assert k.pool.idle == 1 and k.asked == ["threads", "kill_others"]
        k.asked.clear()
        assert await k.pool.acquire("key") is k.h
        assert k.asked == ["cgroup.procs"]
    asyncio.run(go())


@pytest.mark.parametrize("left", [[pm.LEFT_THREAD], [pm.LEFT_CHILD], [pm.LEFT_MODULES]])
def test_the_workers_word_retires_it_whatever_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          left: list[str]) -> None:
    async def go() -> None:
        k = _Kept(tmp_path, monkeypatch, "2")
        await k.pool.release(k.h, "key", left)
        assert k.pool.idle == 0 and k.asked == ["threads", f"signal {signal.SIGKILL}"]
    asyncio.run(go())


def test_a_process_that_appears_between_jobs_is_looked_for_at_acquire(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept on the count; before its next job the group holds more: its processes are read, the
    stranger is killed, and a worker that is not found alone is retired for a fresh one."""
    monkeypatch.setattr(pool_module, "LEFTOVER_WAIT", 0.05)

    async def go() -> None:
        k = _Kept(tmp_path, monkeypatch, "2")
        await k.pool.release(k.h, "key", [])
        assert k.asked == []
        k.set("3", procs=[k.h.pid, 999_998])
        got = await k.pool.acquire("key")
        assert got is not k.h and got in k.forks.spawned
        assert k.asked.count("cgroup.procs") == pool_module.LEFTOVER_WAIT_STEPS and "kill_others" in k.asked
        assert k.asked[-1] == f"signal {signal.SIGKILL}"
    asyncio.run(go())


def test_a_fork_server_started_from_a_task_outlives_the_threads_of_that_time() -> None:
    """The fork server dies with the *thread* that started it (its parent-death signal): one
    started on a worker thread of anyio's was killed once that thread, idle for 10 s, ended
    (found as jobs failing with the fork server "killed by signal 9" a while after start)."""
    async def go() -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1"}
        fs = ForkServer(env, os.getcwd(), [], None)
        await anyio.to_thread.run_sync(lambda: None)  # worker thread X, idle
        await fs.astart()  # (started on X, if it went to a worker thread)
        try:
            await fs.wait_ready()
            pid = fs.pid
            assert pid is not None
            async with anyio.create_task_group() as tg:  # X and a new thread Y; X idle first
                tg.start_soon(anyio.to_thread.run_sync, time.sleep, 0.05)
                tg.start_soon(anyio.to_thread.run_sync, time.sleep, 0.5)
            await anyio.sleep(11)  # past anyio's idle time for a worker thread (10 s): the next
            await anyio.to_thread.run_sync(lambda: None)  # work goes to Y and ends X
            await anyio.sleep(0.5)
            assert fs.ready and os.path.exists(f"/proc/{pid}"), "the fork server died with a thread"
            worker = await fs.spawn(1)
            worker.signal(9)
            worker.close_pipe()
        finally:
            await fs.aclose()
    asyncio.run(go())
