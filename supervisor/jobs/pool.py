"""The warm pool: workers forked before they are needed, and workers kept for another job.

A job start costs a pipe write when a warm worker waits for it. Workers are reused only
within one key (same principal, agent, lease and limits), and only when their job left
nothing behind.

The pool's background work (the warm workers' spawns, and the fork server's, see
`ForkServer.serve`) belongs to `run()`, which its owner runs in a task group:

    async with anyio.create_task_group() as tg:
        await tg.start(pool.run)
        ...
        pool.close()  # run() returns once every spawn it started has ended

Nothing outlives it: a spawn in flight is cancelled, a worker it brought after the pool
closed is retired.
"""

from __future__ import annotations

import logging
import signal
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence

import anyio
from anyio.abc import TaskGroup, TaskStatus

from shared import pipe_messages as pm
from supervisor.jobs.fork_server import ForkServer
from supervisor.jobs.worker_handle import WorkerHandle, WorkerSpawnError

log = logging.getLogger("arcp.workers")

LEFTOVER_WAIT, LEFTOVER_WAIT_STEPS = 0.5, 50  # for killed leftovers to leave a kept worker's cgroup


class WorkerPool:
    """Warm workers ready before they are needed; reuse only within one key."""

    def __init__(self, fork_server: ForkServer, warm: int, reuse: int, max_idle_reused: int = 32,
                 on_spawn: Callable[[WorkerHandle], None] | None = None,
                 on_keep: Callable[[WorkerHandle], Awaitable[None]] | None = None) -> None:
        """`on_spawn` prepares each new worker (its temp dir) before it waits in the pool;
        `on_keep` resets a worker kept for another job of its key."""
        self._fs = fork_server
        self._on_spawn = on_spawn
        self._on_keep = on_keep
        self._warm = max(0, warm)
        self._reuse = max(1, reuse)
        self._max_idle_reused = max_idle_reused
        self._fresh: deque[WorkerHandle] = deque()
        self._reused: dict[Hashable, deque[WorkerHandle]] = {}
        self._reused_count = 0
        self._refilling = 0
        self._tg: TaskGroup | None = None  # run()'s, while it runs
        self._closing = anyio.Event()
        self._closed = False

    # -- its life --------------------------------------------------------------------------
    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep the warm workers coming until `close()` (or until cancelled); the fork server's
        background work runs here too. Returns once every task it started has ended."""
        if self._tg is not None:
            raise RuntimeError("WorkerPool.run() is already running")
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._fs.serve, name="fork server clean-up")
                self._refill()
                task_status.started()
                await self._closing.wait()
                tg.cancel_scope.cancel()
        finally:
            self._tg = None

    def close(self) -> None:
        """Retire the idle workers and end `run()` (its spawns in flight are cancelled)."""
        self._closed = True
        self._closing.set()
        for h in self._fresh:
            self.retire(h)
        self._fresh.clear()
        for idle in self._reused.values():
            for h in idle:
                self.retire(h)
        self._reused.clear()
        self._reused_count = 0

    # -- workers ----------------------------------------------------------------------------
    @property
    def idle(self) -> int:
        """Workers waiting for a job: fresh ones, and those kept for another job of their key."""
        return len(self._fresh) + self._reused_count

    async def acquire(self, key: Hashable) -> WorkerHandle:
        if self._reuse > 1:
            idle = self._reused.get(key)
            while idle:
                h = idle.popleft()
                self._reused_count -= 1
                if not h.alive:
                    h.close_pipe()
                elif _idle_by_count(h) or await self._alone(h):
                    return h
                else:
                    self.retire(h)
        while self._fresh:
            h = self._fresh.popleft()
            self._refill()
            if h.alive:
                return h
            h.close_pipe()
        self._refill()
        return await self._prepared(await self._fs.spawn(self._reuse))

    async def _prepared(self, h: WorkerHandle) -> WorkerHandle:
        """The new worker made ready by `on_spawn`, on a thread (a mkdir, a tmpfs mount)."""
        if self._on_spawn is not None:
            try:
                await anyio.to_thread.run_sync(self._on_spawn, h)
            except OSError as e:
                self.retire(h)
                raise WorkerSpawnError(f"cannot prepare worker {h.pid}: {e}") from e
        return h

    async def release(self, handle: WorkerHandle, key: Hashable, left: Sequence[str] = ()) -> None:
        """A job ended normally on `handle`: keep it for `key` or retire it.

        Kept, it is cleared of what its job left: every other process of its cgroup is
        killed. It is retired instead if the job left something in the worker itself (`left`,
        the worker's word: a thread, a child process, a changed sys.modules; or more threads
        than an idle worker has, the kernel's word), or if it has no cgroup in which to find
        what the job left.

        The common case costs one counter read: the worker says it has nothing left and its
        group holds no more tasks than an idle worker's threads (`_idle_by_count`), so there
        is no thread to count and no process to kill. Otherwise the kernel is asked on a
        thread (/proc and cgroupfs reads)."""
        handle.jobs_run += 1
        if not self._keeps(handle):
            self.retire(handle)
            return
        if left or not _idle_by_count(handle):
            left, killed = await anyio.to_thread.run_sync(_left_in, handle, list(left))
            if left:
                log.info("worker %d not reused: its job left %s", handle.pid, ", ".join(left))
                self.retire(handle)
                return
            if killed:
                log.info("worker %d: killed %d processes its job left (%s)", handle.pid, len(killed),
                         " ".join(map(str, killed)))
            if not self._keeps(handle):  # the pool closed, or the worker died, meanwhile
                self.retire(handle)
                return
        if self._reused_count >= self._max_idle_reused:
            self._evict_one()
        if self._on_keep is not None:  # it empties the worker's temp dir (on a thread, if there is anything)
            await self._on_keep(handle)
            if not self._keeps(handle):
                self.retire(handle)
                return
        self._reused.setdefault(key, deque()).append(handle)
        self._reused_count += 1

    def _keeps(self, handle: WorkerHandle) -> bool:
        return self._reuse > 1 and not self._closed and handle.alive and handle.jobs_run < self._reuse

    async def _alone(self, h: WorkerHandle) -> bool:
        """Is a kept worker alone in its cgroup (what its last job left is gone)? Kills
        stragglers and waits for them a little; False if some remain."""
        cg = h.cgroup
        if cg is None:
            return False
        try:
            for _ in range(LEFTOVER_WAIT_STEPS):
                if await anyio.to_thread.run_sync(_alone_now, h):
                    return True
                await anyio.sleep(LEFTOVER_WAIT / LEFTOVER_WAIT_STEPS)
        except OSError as e:
            log.warning("worker %d not reused: %s", h.pid, e)
            return False
        log.warning("worker %d not reused: processes its last job left outlived SIGKILL", h.pid)
        return False

    def retire(self, handle: WorkerHandle) -> None:
        """End a worker now (its job is over): kill its group, close its pipe."""
        handle.signal(signal.SIGKILL)
        handle.close_pipe()

    def _evict_one(self) -> None:
        for key, idle in self._reused.items():
            if idle:
                self.retire(idle.popleft())
                self._reused_count -= 1
                if not idle:
                    del self._reused[key]
                return

    # -- warm workers ---------------------------------------------------------------------------
    def _refill(self) -> None:
        """Spawn warm workers up to the mark, in run()'s task group (none while it does not run:
        a job then waits for a fork of its own)."""
        tg = self._tg
        if self._closed or tg is None:
            return
        while len(self._fresh) + self._refilling < self._warm:
            self._refilling += 1
            tg.start_soon(self._spawn_one)

    async def _spawn_one(self) -> None:
        try:
            h = await self._prepared(await self._fs.spawn(self._reuse))
        except (WorkerSpawnError, TimeoutError, OSError) as e:
            log.error("could not start a warm worker: %s", e)
            return
        except Exception:
            log.exception("could not start a warm worker")
            return
        finally:
            self._refilling -= 1
        if self._closed:
            self.retire(h)
        else:
            self._fresh.append(h)


def _idle_by_count(h: WorkerHandle) -> bool:
    """Does the worker's cgroup hold no more tasks than an idle worker's threads (its main
    thread and its pipe thread)? The pids controller counts every thread and process of the
    group, exited ones not yet reaped included, so no other process, and no thread beyond
    those two, can be there. One read of `pids.current` (a descriptor kept open, read afresh
    at offset 0: a few microseconds), on the calling thread; False where it cannot be told
    (no cgroup, no pids controller, an unreadable group)."""
    cg = h.cgroup
    if cg is None:
        return False
    n = cg.pids_current()
    return n is not None and n <= pm.IDLE_THREADS


def _left_in(handle: WorkerHandle, left: list[str]) -> tuple[list[str], list[int]]:
    """On a thread: what the job left in its worker (its word, and the kernel's count of
    threads); if nothing, the other processes of its cgroup are killed (their pids)."""
    threads = handle.thread_count()
    if threads is not None and threads > pm.IDLE_THREADS and pm.LEFT_THREAD not in left:
        left.append(pm.LEFT_THREAD)
    if handle.cgroup is None:
        left.append("no cgroup to search")
    if left:
        return left, []
    assert handle.cgroup is not None
    return left, handle.cgroup.kill_others(handle.pid)


def _alone_now(h: WorkerHandle) -> bool:
    """On a thread: is the worker alone in its cgroup? If not, the others are killed
    (OSError when the group cannot be read)."""
    assert h.cgroup is not None
    if not any(pid != h.pid for pid in h.cgroup.pids(strict=True)):
        return True
    h.cgroup.kill_others(h.pid)
    return False
