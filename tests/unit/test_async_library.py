"""The runtime starts tasks from the event loop's own callbacks (timers, readers, futures'
callbacks). With sniffio installed (a test dependency for this reason), anyio asks it which
library runs, and it answers only inside a task unless the context says so: the server
marks its context at start, and a task started from a callback then runs."""

from __future__ import annotations

import asyncio

import anyio
import sniffio

from supervisor.async_library import declare_asyncio


async def _start_from_a_callback() -> list[BaseException]:
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

        asyncio.get_running_loop().call_later(0.01, callback)
        with anyio.fail_after(5):
            await ran.wait()
    return errors


def test_a_task_started_from_a_loop_callback_runs_once_the_context_is_marked() -> None:
    async def main() -> list[BaseException]:
        assert declare_asyncio() is True
        assert sniffio.current_async_library() == "asyncio"
        return await _start_from_a_callback()

    assert asyncio.run(main()) == []
