"""A session's outbound queue of serialised frames: sequence numbers, order, and back-pressure.

Frames are stamped with the session's next `event_seq` at the moment they are
queued, so the queue order is the number order and one writer sends them in
that order. Past the high-water mark (in frames or in bytes, whichever comes
first), producers (job pumps) wait until the writer has brought the queue
below the low-water marks: the supervisor then stops reading those workers'
pipes, and their agents block, instead of this queue growing. Frames that no
pump waits for (another session's jobs followed by subscription, a resume's
replay) can still take it further; past the hard limit the client is taken to
have stopped reading: the queue is dropped and `on_overflow` is called (the
session closes the transport; the client may resume from the session's log).
With no transport attached the frames are dropped: the session's frames are
logged in the store, and a resume replays them from there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

MiB = 1024 * 1024
HIGH_WATER_BYTES = 16 * MiB
BATCH_BYTES = 1 * MiB  # what the writer takes at once (at least one frame)


class Outbox:
    def __init__(self, high_water: int = 2048, low_water: int = 512, high_bytes: int = HIGH_WATER_BYTES,
                 low_bytes: int | None = None, hard_bytes: int | None = None) -> None:
        self.high_water = high_water
        self.low_water = low_water
        self.high_bytes = high_bytes
        self.low_bytes = high_bytes // 2 if low_bytes is None else low_bytes
        self.hard_bytes = 4 * high_bytes if hard_bytes is None else hard_bytes
        self.on_overflow: Callable[[int], None] | None = None
        self._queue: deque[bytes] = deque()
        self._bytes = 0
        self._nonempty = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.attached = True
        self._stalled_since: float | None = None

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def put(self, frame: bytes) -> None:
        if not self.attached:
            return
        self._queue.append(frame)
        self._added(len(frame))

    def insert(self, index: int, frames: list[bytes]) -> None:
        """Queue `frames` at `index`, before what was queued after it (a resume's replay goes
        after its welcome and before the frames sent since); the limits apply as to `put`."""
        if not self.attached or not frames:
            return
        q = list(self._queue)
        q[index:index] = frames
        self._queue = deque(q)
        self._added(sum(len(f) for f in frames))

    def _added(self, added: int) -> None:
        self._bytes += added
        self._nonempty.set()
        if (len(self._queue) >= self.high_water or self._bytes >= self.high_bytes) and self._writable.is_set():
            self._writable.clear()
            self._stalled_since = time.monotonic()
        if self._bytes > self.hard_bytes:
            queued = self._bytes
            self.detach()
            if self.on_overflow is not None:
                self.on_overflow(queued)

    @property
    def writable(self) -> bool:
        """Below the high-water marks (or detached: nothing is kept)."""
        return self._writable.is_set()

    async def wait_writable(self) -> None:
        """Return once the queue is below its high-water marks (at once when it is)."""
        if not self._writable.is_set():
            await self._writable.wait()

    async def get_batch(self, max_items: int = 256, max_bytes: int = BATCH_BYTES) -> list[bytes]:
        while not self._queue:
            self._nonempty.clear()
            await self._nonempty.wait()
        q = self._queue
        batch = [q.popleft()]
        size = len(batch[0])
        while q and len(batch) < max_items and size + len(q[0]) <= max_bytes:
            frame = q.popleft()
            batch.append(frame)
            size += len(frame)
        self._bytes = max(0, self._bytes - size) if q else 0
        if len(q) <= self.low_water and self._bytes <= self.low_bytes and not self._writable.is_set():
            self._writable.set()
            self._stalled_since = None
        return batch

    def detach(self) -> None:
        """The transport is gone: drop what is queued and release blocked producers."""
        self.attached = False
        self._queue.clear()
        self._bytes = 0
        self._writable.set()
        self._nonempty.set()
        self._stalled_since = None

    def attach(self) -> None:
        """A transport (a new one, on resume) takes frames again."""
        self.attached = True
        self._nonempty.clear()

    def stalled_for(self, now: float) -> float:
        """Seconds the queue has been at its high-water mark (0 when it is not)."""
        return 0.0 if self._stalled_since is None else now - self._stalled_since
