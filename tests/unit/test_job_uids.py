"""supervisor/job_uids.py: jobs waiting for a uid are served in their start order."""

from __future__ import annotations

import asyncio

from supervisor.sandbox.job_uids import UidPool


def test_waiters_are_served_in_start_order_not_arrival_order() -> None:
    async def go() -> None:
        pool = UidPool(10, 10)
        assert await pool.acquire(1) == 10
        late = asyncio.ensure_future(pool.acquire(5))  # asks first, started later
        early = asyncio.ensure_future(pool.acquire(3))
        same = asyncio.ensure_future(pool.acquire(5))  # same place: first come
        await asyncio.sleep(0)
        assert not (late.done() or early.done() or same.done())
        pool.release(10)
        assert await asyncio.wait_for(early, 5) == 10 and not late.done()
        pool.release(10)
        assert await asyncio.wait_for(late, 5) == 10 and not same.done()
        pool.release(10)
        assert await asyncio.wait_for(same, 5) == 10
    asyncio.run(go())


def test_a_cancelled_waiter_is_skipped() -> None:
    async def go() -> None:
        pool = UidPool(7, 7)
        await pool.acquire(1)
        gone = asyncio.ensure_future(pool.acquire(2))
        next_ = asyncio.ensure_future(pool.acquire(3))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        pool.release(7)
        assert await asyncio.wait_for(next_, 5) == 7 and pool.free == 0
    asyncio.run(go())
