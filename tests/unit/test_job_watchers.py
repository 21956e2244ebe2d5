"""What runs beside a job's pump, in its runner's one task group: the limit watch (a timer's
callback where the worker's cgroup gives every figure, a task where the process tree must be
walked; either kills the worker once a limit is passed, and neither looks again after
`stop()`), and the calls answered later (cancelled, unanswered, when the pump ends)."""

from __future__ import annotations

import asyncio
import signal
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from supervisor.core.usage import TreeSample
from supervisor.jobs import limit_watch
from supervisor.jobs.limit_watch import LimitWatch

MiB = 1024 * 1024


class _Cgroup:
    counts_cpu = True
    limits_memory = True

    def __init__(self) -> None:
        self.cpu_ns = 0
        self.reads = 0

    def cpu_usage_ns(self) -> int:
        self.reads += 1
        return self.cpu_ns


class _Worker:
    def __init__(self, cgroup: _Cgroup | None) -> None:
        self.cgroup = cgroup
        self.pid = 4242
        self.alive = True
        self.signals: list[int] = []

    def signal(self, sig: int) -> None:
        self.signals.append(sig)


def _watch(cpu_time: int = 1, memory: int = 64 * MiB) -> LimitWatch:
    job = SimpleNamespace(id="job_1", done=False)
    request = SimpleNamespace(limits=SimpleNamespace(cpu_time=cpu_time, memory=memory))
    life = SimpleNamespace(stopping=False)
    return LimitWatch(job, request, life, asyncio.Event())  # type: ignore[arg-type]


async def _until(pred: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


def test_the_watch_is_a_timer_where_the_cgroup_counts_and_kills_a_tree_past_its_cpu_time() -> None:
    async def main() -> None:
        watch, cg = _watch(cpu_time=1), _Cgroup()
        worker = _Worker(cg)
        async with anyio.create_task_group() as tg:
            watch.start(tg, worker, None, False)  # type: ignore[arg-type]
            await _until(lambda: cg.reads >= 2)  # it looks every POLL_INTERVAL
            assert worker.signals == []
            cg.cpu_ns = 2_000_000_000  # past its 1 s
            await _until(lambda: worker.signals)
            assert worker.signals == [signal.SIGKILL] and watch.cpu_exceeded
            reads = cg.reads
            await anyio.sleep(3 * limit_watch.POLL_INTERVAL)
            assert cg.reads == reads, "the watch looked again after it killed the worker"
            watch.stop()

    asyncio.run(main())


def test_a_stopped_timer_watch_looks_no_more() -> None:
    async def main() -> None:
        watch, cg = _watch(), _Cgroup()
        async with anyio.create_task_group() as tg:
            watch.start(tg, _Worker(cg), None, False)  # type: ignore[arg-type]
            await _until(lambda: cg.reads >= 1)
            watch.stop()
            reads = cg.reads
            await anyio.sleep(3 * limit_watch.POLL_INTERVAL)
            assert cg.reads == reads

    asyncio.run(main())


def test_without_a_memory_cgroup_the_watch_walks_the_tree_in_a_task_and_stop_ends_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    samples: list[int] = []
    rss = [10 * MiB]

    def sample_tree(pid: int) -> TreeSample:
        samples.append(pid)
        return TreeSample(rss=rss[0], tasks=1, cpu_user_s=0.0, cpu_sys_s=0.0)

    monkeypatch.setattr(limit_watch, "sample_tree", sample_tree)

    async def main() -> None:
        watch = _watch(memory=64 * MiB)
        worker = _Worker(None)  # no cgroup: the memory limit is the watch's
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:  # its exit waits for the watch's task
                watch.start(tg, worker, None, True)  # type: ignore[arg-type]
                await _until(lambda: len(samples) >= 2)
                assert worker.signals == []
                watch.stop()  # its task ends: the group exits
        n = len(samples)
        await anyio.sleep(3 * limit_watch.POLL_INTERVAL)
        assert len(samples) == n

        watch = _watch(memory=64 * MiB)
        worker = _Worker(None)
        rss[0] = 100 * MiB
        async with anyio.create_task_group() as tg:
            watch.start(tg, worker, None, True)  # type: ignore[arg-type]
            await _until(lambda: worker.signals)
        assert worker.signals == [signal.SIGKILL] and watch.memory_exceeded and watch.logged

    asyncio.run(main())


# -- calls answered later (frame_pump.py): cancelled with their answer when the pump ends ------

class _Writer:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_a_call_still_waiting_when_the_pump_ends_is_cancelled_and_never_answered() -> None:
    from supervisor.jobs.calls import Later
    from supervisor.jobs.frame_pump import FramePump
    from supervisor.jobs.worker_rpc import Call

    async def main() -> None:
        job = SimpleNamespace(id="job_1", done=False)
        pump = FramePump(SimpleNamespace(), job, SimpleNamespace(), SimpleNamespace(), SimpleNamespace())  # type: ignore[arg-type]
        answered = anyio.Event()
        forever = anyio.Event()

        async def quick() -> str:
            answered.set()
            return "ok"

        async def slow() -> str:
            await forever.wait()
            return "too late"

        writer = _Writer()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                pump.group = tg
                pump._answer_later(writer, Call(1, "fs.check", []), Later(quick, "path check"))  # type: ignore[arg-type]
                pump._answer_later(writer, Call(2, "fs.check", []), Later(slow, "path check"))  # type: ignore[arg-type]
                await answered.wait()
                await _until(lambda: len(writer.written) == 1)
                assert pump._waiting == {"path check": 1}
                pump.group = None
                pump.cancel_waiting()  # the pump has ended: the group exits without waiting for it
        assert len(writer.written) == 1, "the cancelled call was answered"
        assert pump._waiting == {"path check": 0}

    asyncio.run(main())
