"""The runtime starts tasks from the event loop's own callbacks (timers, readers, futures'
callbacks, and callbacks handed over from its threads). With sniffio installed (a test
dependency for this reason), anyio asks it which library runs, and it answers only inside a
task unless told: the server tells it at start, for the thread running the loop, and a task
started from any such callback then runs."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
import sniffio

from supervisor.async_library import declare_asyncio


async def _start_from_a_callback(from_thread: bool) -> list[BaseException]:
    errors: list[BaseException] = []
    ran = asyncio.Event()

    async def task() -> None:
        ran.set()

    async with anyio.create_task_group() as tg:
        def callback() -> None:
            try:
                tg.start_soon(task)
            except Exception as e:  # noqa: BLE001 (what the test looks for)
                errors.append(e)
                ran.set()

        loop = asyncio.get_running_loop()
        if from_thread:  # as the PostgreSQL listener's thread hands a notification over
            threading.Thread(target=loop.call_soon_threadsafe, args=(callback,)).start()
        else:  # as a job's timeout timer fires
            loop.call_later(0.01, callback)
        with anyio.fail_after(5):
            await ran.wait()
    return errors


@pytest.mark.parametrize("from_thread", [False, True], ids=["timer", "another-thread"])
def test_a_task_started_from_a_loop_callback_runs_once_the_loop_thread_is_marked(from_thread: bool) -> None:
    async def main() -> list[BaseException]:
        assert declare_asyncio() is True
        assert sniffio.current_async_library() == "asyncio"
        return await _start_from_a_callback(from_thread)

    try:
        assert asyncio.run(main()) == []
    finally:
        sniffio.thread_local.name = None  # (this test's thread is pytest's own)
