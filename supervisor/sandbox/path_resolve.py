"""Resolving a job's fs.* targets as the job itself would (path_walk.py), off the event loop.

A path check resolves the job's target with the job's credentials, in the job's view of the
filesystem, one directory at a time (path_walk.py `resolve_as`); that resolution may block
in a slow filesystem, so it never runs on the event loop.

Each resolution runs on a resolver thread (the credentials are per thread, and
are restored after each resolution; a thread that cannot restore them ends); at
most MAX_THREADS run at once, and the caller waits at most its timeout. A
thread stuck in a slow filesystem keeps its slot until it returns. Errors never
name what a path resolved to.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import weakref
from collections.abc import Callable

from supervisor.sandbox.path_walk import PathRefused, resolve_as, this_thread

RESOLVE_TIMEOUT = 2.0  # seconds a job's path check may take before it is answered with TIMEOUT
MAX_THREADS = 32  # resolutions running at once, over all jobs (stuck ones included)


class ResolverBusy(Exception):
    """No resolution slot came free in time."""


class ResolveTimeout(Exception):
    """The resolution took longer than its timeout; `pending` settles when its thread returns."""

    def __init__(self, timeout: float, pending: asyncio.Future[str]) -> None:
        super().__init__(f"resolving the path took more than {timeout:g} s")
        self.pending = pending


_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _slot_semaphore(loop: asyncio.AbstractEventLoop) -> asyncio.Semaphore:
    sem = _slots.get(loop)
    if sem is None:
        sem = _slots[loop] = asyncio.Semaphore(MAX_THREADS)
    return sem


class _Threads:
    """Resolver threads, kept for reuse while they have work: a thread that has waited
    IDLE_EXIT seconds for a task ends. At most MAX_THREADS tasks run at once (the callers'
    semaphore), so at most MAX_THREADS threads exist. A thread whose credentials could
    not be restored ends at once."""

    IDLE_EXIT = 30.0

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, task: Callable[[], None]) -> None:
        with self._lock:
            self._tasks.put(task)
            if self._idle:
                self._idle -= 1  # one waiting thread will take it
                return
        threading.Thread(target=self._serve, name="arcp-resolve", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                task = self._tasks.get(timeout=self.IDLE_EXIT)
            except queue.Empty:
                with self._lock:
                    try:
                        task = self._tasks.get_nowait()  # put for this thread just now
                    except queue.Empty:
                        self._idle -= 1
                        return
            task()
            if this_thread.tainted:
                return
            with self._lock:
                self._idle += 1


_threads = _Threads()


def start(fn: Callable[[], str], loop: asyncio.AbstractEventLoop,
          on_done: Callable[[], None]) -> asyncio.Future[str]:
    """Run `fn` on a resolver thread; its outcome lands in the returned future, and
    `on_done` runs on the loop when it has returned (however late)."""
    fut: asyncio.Future[str] = loop.create_future()

    def settle(ok: bool, value: object) -> None:
        on_done()
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            fut.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, object] = (True, fn())
        except BaseException as e:  # noqa: BLE001 - handed to the loop as it is
            outcome = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle, *outcome)

    _threads.submit(run)
    return fut


async def resolve(path: str, *, uid: int | None, root_pid: int | None,
                  timeout: float = RESOLVE_TIMEOUT) -> str:
    """Resolve `path` for a job without blocking the loop; wait at most `timeout` seconds.

    Raises PathRefused, ResolverBusy (no slot within the timeout), ResolveTimeout (the
    thread is still running: it keeps its slot until it returns).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sem = _slot_semaphore(loop)
    if sem.locked():
        try:
            await asyncio.wait_for(sem.acquire(), timeout)
        except TimeoutError:
            raise ResolverBusy(f"no path resolution slot came free within {timeout:g} s") from None
    else:
        await sem.acquire()  # free: no wait
    fut = start(lambda: resolve_as(path, uid, root_pid), loop, sem.release)
    # Wait for the thread's word or the deadline, whichever comes first, without cancelling it.
    waiter: asyncio.Future[str] = loop.create_future()

    def relay(f: asyncio.Future[str]) -> None:
        if waiter.done():
            return
        if f.exception() is not None:
            waiter.set_exception(f.exception())  # type: ignore[arg-type]
        else:
            waiter.set_result(f.result())

    def expire() -> None:
        if not waiter.done():
            waiter.set_exception(ResolveTimeout(timeout, fut))

    fut.add_done_callback(relay)
    timer = loop.call_at(deadline, expire)
    try:
        return await waiter
    except ResolveTimeout:
        fut.add_done_callback(_consume)
        raise
    finally:
        timer.cancel()
        if not waiter.done():  # we were cancelled: the thread's word is nobody's news
            waiter.cancel()
            fut.add_done_callback(_consume)


def _consume(fut: asyncio.Future[str]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: an abandoned resolution's error is nobody's news


__all__ = ["MAX_THREADS", "PathRefused", "RESOLVE_TIMEOUT", "ResolveTimeout", "ResolverBusy", "resolve", "resolve_as",
           "start"]
