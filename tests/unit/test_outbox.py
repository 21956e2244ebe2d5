"""supervisor/outbox.py: back-pressure counted in frames and in bytes."""

from __future__ import annotations

import asyncio

from supervisor.core.outbox import Outbox

MiB = 1024 * 1024


def test_bytes_past_the_high_water_mark_pause_producers() -> None:
    async def go() -> None:
        box = Outbox(high_bytes=4 * MiB)
        for _ in range(3):
            box.put(b"x" * MiB)
        await asyncio.wait_for(box.wait_writable(), 5)  # 3 MiB: below the mark
        box.put(b"x" * MiB)  # 4 frames only, but 4 MiB
        waiter = asyncio.ensure_future(box.wait_writable())
        await asyncio.sleep(0)  # the waiter runs up to its wait
        assert not waiter.done() and box.stalled_for(10**9) > 0
        assert len(await box.get_batch()) == 1  # 3 MiB left: above the low-water mark (2 MiB)
        await asyncio.sleep(0)  # a wake-up, had there been one, would have run now
        assert not waiter.done()
        await box.get_batch()  # 2 MiB: at the low-water mark
        await asyncio.wait_for(waiter, 5)
        assert box.queued_bytes == 2 * MiB and box.stalled_for(10**9) == 0
    asyncio.run(go())


def test_a_batch_is_bounded_in_bytes_but_takes_at_least_one_frame() -> None:
    async def go() -> None:
        box = Outbox()
        box.put(b"a" * (3 * MiB))
        for _ in range(10):
            box.put(b"b" * (300 * 1024))
        assert [len(f) for f in await box.get_batch()] == [3 * MiB]
        assert len(await box.get_batch()) == 3  # 900 KiB of the 1 MiB a batch may carry
        small = Outbox()
        for i in range(300):
            small.put(b"%d" % i)
        assert len(await small.get_batch()) == 256
        assert len(await small.get_batch()) == 44 and small.queued_bytes == 0
    asyncio.run(go())


def test_past_the_hard_limit_the_queue_is_dropped_and_the_owner_told() -> None:
    async def go() -> None:
        told: list[int] = []
        box = Outbox(high_bytes=MiB, hard_bytes=3 * MiB)
        box.on_overflow = told.append
        waiter = None
        for i in range(4):
            box.put(b"x" * MiB)
            if i == 1:
                waiter = asyncio.ensure_future(box.wait_writable())
        assert told == [4 * MiB]
        assert not box.attached and len(box) == 0 and box.queued_bytes == 0
        assert waiter is not None
        await asyncio.wait_for(waiter, 1)  # producers are released
        box.put(b"late")  # dropped: the transport is being closed
        assert len(box) == 0 and told == [4 * MiB]
        box.attach()  # a resume
        box.put(b"again")
        assert len(box) == 1
    asyncio.run(go())


def test_frame_count_mark_still_holds() -> None:
    async def go() -> None:
        box = Outbox(high_water=4, low_water=1)
        for _ in range(4):
            box.put(b"x")
        assert box.stalled_for(10**9) > 0
        await box.get_batch(max_items=3)
        assert box.stalled_for(10**9) == 0
    asyncio.run(go())


def test_a_replay_goes_after_the_welcome_and_before_what_was_sent_since() -> None:
    box = Outbox()
    box.put(b"welcome")
    box.put(b"live-1")
    box.insert(1, [b"old-1", b"old-2"])
    assert asyncio.run(box.get_batch()) == [b"welcome", b"old-1", b"old-2", b"live-1"]
    assert box.queued_bytes == 0
