"""A session's outbound queue of serialised frames: sequence numbers, order, and back-pressure.

Frames are stamped with the session's next `event_seq` at the moment they are
queued, so the queue order is the number order and one writer sends them in
that order. Past the high-water mark, producers (job pumps) wait until the
writer has brought the queue below the low-water mark: the supervisor then
stops reading those workers' pipes, and their agents block, instead of this
queue growing. With no transport attached the frames are dropped: the session's
frames are logged in the store, and a resume replays them from there.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class Outbox:
    def __init__(self, high_water: int = 2048, low_water: int = 512) -> None:
        self.high_water = high_water
        self.low_water = low_water
        self._queue: deque[bytes] = deque()
        self._nonempty = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self.attached = True
        self._stalled_since: float | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, frame: bytes) -> None:
        if not self.attached:
            return
        self._queue.append(frame)
        self._nonempty.set()
        if len(self._queue) >= self.high_water and self._writable.is_set():
            self._writable.clear()
            self._stalled_since = time.monotonic()

    async def wait_writable(self) -> None:
        """Return once the queue is below its high-water mark (at once when it is)."""
        if not self._writable.is_set():
            await self._writable.wait()

    async def get_batch(self, max_items: int = 256) -> list[bytes]:
        while not self._queue:
            self._nonempty.clear()
            await self._nonempty.wait()
        n = min(max_items, len(self._queue))
        batch = [self._queue.popleft() for _ in range(n)]
        if len(self._queue) <= self.low_water and not self._writable.is_set():
            self._writable.set()
            self._stalled_since = None
        return batch

    def detach(self) -> None:
        """The transport is gone: drop what is queued and release blocked producers."""
        self.attached = False
        self._queue.clear()
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
