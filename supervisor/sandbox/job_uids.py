"""The pool of unprivileged uids jobs run as (`[sandbox] job_uids = "FIRST-LAST"`).

A worker takes a uid at its first job and keeps it for the jobs it may run
after (one reuse key: one principal, agent and lease); the uid comes back to
the pool only once the worker is gone and every process left in its cgroup
has been killed, so no process of one job ever shares a uid with the next.
Returned uids go to the back of the queue: a uid is reused as late as possible.
Jobs that wait for a uid are served in their start order (admission.py), not in
the order they happened to get to ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import signal
from collections import deque

import psutil

log = logging.getLogger("arcp.workers")


class UidPool:
    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self._free: deque[int] = deque(range(first, last + 1))
        self._waiters: list[tuple[int, int, asyncio.Future[int]]] = []  # a heap: (order, arrival, waiter)
        self._arrivals = itertools.count()

    @property
    def free(self) -> int:
        return len(self._free)

    async def acquire(self, order: int = 0) -> int:
        """A uid no live process of an earlier job has; waits while every uid is in use.
        Waiters are served lowest `order` first (the job's start order), then first come."""
        if self._free and not self._waiters:
            return self._free.popleft()
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (order, next(self._arrivals), fut))
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())
            raise

    def release(self, uid: int, sweep: bool = False) -> None:
        """Give `uid` back; with `sweep` (no cgroup held the worker's processes), first kill
        whatever still runs as it."""
        if sweep:
            kill_processes_of(uid)
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(uid)
                return
        self._free.append(uid)


def kill_processes_of(uid: int) -> int:
    killed = 0
    for p in psutil.process_iter(["uids"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] is not None and uid in (p.info["uids"].real, p.info["uids"].effective):
                p.send_signal(signal.SIGKILL)
                killed += 1
    if killed:
        log.warning("killed %d process(es) left running as uid %d", killed, uid)
    return killed
