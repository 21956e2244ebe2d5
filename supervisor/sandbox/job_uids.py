"""The pool of unprivileged uids jobs run as (`[sandbox] job_uids = "FIRST-LAST"`).

A worker takes a uid at its first job and keeps it for the jobs it may run
after (one reuse key: one principal, agent and lease); the uid comes back to
the pool only once the worker is gone and every process left in its cgroup
has been killed, so no process of one job ever shares a uid with the next.
Returned uids go to the back of the queue: a uid is reused as late as possible.
Jobs that wait for a uid are served in their start order (admission.py), not in
the order they happened to get to ask.

Several supervisors on one host (the same default range, or ranges that overlap) must never
give two jobs one uid: each uid in use is claimed host-wide by a POSIX record lock on the
byte at offset `uid` of one lock file (`HostUidClaims`), held by the supervisor from the
moment it takes the uid until it has given it back. A uid another supervisor holds is
skipped; the kernel drops a dead supervisor's locks with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import os
import signal
from collections import deque

import psutil

log = logging.getLogger("arcp.workers")


HOST_CLAIMS = "/run/arcp-supervisor/job-uids.lock"
CLAIM_RETRY = 0.05  # seconds between two looks when every free uid is claimed by other supervisors


class HostUidClaims:
    """Host-wide claims on uids, shared by every supervisor on the host: a claim is a POSIX
    record lock (fcntl F_SETLK) on the byte at offset `uid` of one file, owned by this
    process. `claim()` never waits; the kernel drops a process's claims when it exits."""

    def __init__(self, path: str = HOST_CLAIMS) -> None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def claim(self, uid: int) -> bool:
        """True once `uid` is ours; False if another process holds it (or the claims are
        closed: the supervisor is stopping)."""
        if self._fd < 0:
            return False
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, uid, os.SEEK_SET)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def unclaim(self, uid: int) -> None:
        if self._fd >= 0:  # (closed: every claim went with the descriptor)
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, uid, os.SEEK_SET)

    def close(self) -> None:
        """Give up every claim (closing the file drops all of this process's locks on it)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class UidPool:
    def __init__(self, first: int, last: int, claims: HostUidClaims | None = None) -> None:
        """`claims`: the host's claims, so that other supervisors' jobs never share a uid with
        ours (None: this pool is the only one handing out these uids)."""
        self.first, self.last = first, last
        self.claims = claims
        self._free: deque[int] = deque(range(first, last + 1))
        self._waiters: list[tuple[int, int, asyncio.Future[int]]] = []  # a heap: (order, arrival, waiter)
        self._arrivals = itertools.count()

    @property
    def free(self) -> int:
        return len(self._free)

    def _take(self) -> int | None:
        """A free uid, claimed host-wide; those another supervisor holds go to the back."""
        for _ in range(len(self._free)):
            uid = self._free.popleft()
            if self.claims is None or self.claims.claim(uid):
                return uid
            self._free.append(uid)
        return None

    async def acquire(self, order: int = 0) -> int:
        """A uid no live process of an earlier job has, and no other supervisor's job; waits
        while every uid is in use. Waiters are served lowest `order` first (the job's start
        order), then first come."""
        while self._free and not self._waiters:
            uid = self._take()
            if uid is not None:
                return uid
            await asyncio.sleep(CLAIM_RETRY)  # every free one is another supervisor's now: look again soon
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
        whatever still runs as it (still claimed by us: no other supervisor's job can be using
        it). A waiter gets it still claimed; else the claim is dropped."""
        if sweep:
            kill_processes_of(uid)
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(uid)
                return
        if self.claims is not None:
            self.claims.unclaim(uid)
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
