"""The workers' cgroups, from the fork server's side: one reserved for each worker it
forks, emptied at the worker's exit, kept a moment for its job to read (an OOM kill), and
then recycled for the next worker (or removed).

Every change to the pool of groups (making a group, 0.1 to 0.3 ms of mkdirs; recycling
or removing one) runs on a worker thread, one at a time (sandbox/cgroups.py's `Cgroups`
is not meant for two threads at once). The release of dead workers' groups belongs to
`serve()`, which the fork server's `serve()` runs.
"""

from __future__ import annotations

import logging
import weakref

import anyio
from anyio.abc import TaskGroup

from supervisor.jobs.worker_handle import CGROUP_LINGER
from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.worker_cgroup import WorkerCgroup

log = logging.getLogger("arcp.workers")


_LANES: weakref.WeakKeyDictionary[Cgroups, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()


def _lane_of(cgroups: Cgroups | None) -> anyio.CapacityLimiter:
    """One lane per Cgroups: the fork servers of several agent environments share their
    pool of groups, which is not for two threads at once."""
    if cgroups is None:
        return anyio.CapacityLimiter(1)
    lane = _LANES.get(cgroups)
    if lane is None:
        lane = _LANES[cgroups] = anyio.CapacityLimiter(1)
    return lane


class WorkerGroups:
    def __init__(self, cgroups: Cgroups | None) -> None:
        self._cgroups = cgroups
        self._lane = _lane_of(cgroups)  # the pool of groups changes on one thread at a time
        self.to_remove: list[WorkerCgroup] = []  # still had (dying) tasks: the next sweep's
        self._released: list[WorkerCgroup] = []  # dead workers' groups while no serve() runs
        self._tg: TaskGroup | None = None  # serve()'s, while it runs

    async def reserve(self) -> WorkerCgroup | None:
        """A group for the next worker (None without cgroups), off the loop: a new one is a
        mkdir per controller."""
        if self._cgroups is None:
            return None
        cgroup = await anyio.to_thread.run_sync(self._cgroups.reserve, limiter=self._lane)
        try:
            await anyio.lowlevel.checkpoint_if_cancelled()
        except BaseException:
            self.unreserve(cgroup)
            raise
        return cgroup

    def unreserve(self, cgroup: WorkerCgroup | None) -> None:
        """The group's worker was never asked for: the group goes back (no I/O unless the
        pool of groups is full)."""
        if cgroup is not None and self._cgroups is not None:
            self._cgroups.unreserve(cgroup)

    def lost(self, cgroup: WorkerCgroup | None) -> None:
        """The fork server did not say whether it forked the group's worker: a late fork may
        still join the group, so it is emptied (by the next sweep) before reuse."""
        if cgroup is not None:
            self.to_remove.append(cgroup)

    def released(self, cgroup: WorkerCgroup) -> None:
        """The group's worker has exited (the fork server reported it)."""
        if self._tg is not None:
            self._tg.start_soon(self._release, cgroup)
        else:
            self._released.append(cgroup)  # serve() takes it when it starts, or the next sweep

    async def _release(self, cgroup: WorkerCgroup) -> None:
        """End whatever the dead worker left in its group now; hand the group to the next
        worker a little later, once its job has read why the worker died."""
        try:
            await anyio.to_thread.run_sync(cgroup.kill_all)
            await anyio.sleep(CGROUP_LINGER)
        except Exception:
            log.exception("cannot empty a dead worker's cgroup")
            self.to_remove.append(cgroup)
            return
        except BaseException:
            self.to_remove.append(cgroup)  # cancelled (the pool stops): the next sweep's
            raise
        await self._recycle(cgroup)

    async def _recycle(self, cgroup: WorkerCgroup) -> None:
        assert self._cgroups is not None
        try:
            recycled = await anyio.to_thread.run_sync(self._cgroups.recycle, cgroup, limiter=self._lane)
        except Exception:  # the group is retried, the others go on
            log.exception("cannot recycle a worker's cgroup")
            recycled = False
        if not recycled:
            self.to_remove.append(cgroup)

    def sweep(self) -> None:
        """Retry groups that still had (dying) tasks: on a thread while `serve()` runs, here
        otherwise (at shutdown)."""
        pending = self.to_remove + self._released
        self.to_remove, self._released = [], []
        if self._cgroups is None:
            return
        for cg in pending:
            if self._tg is not None:
                self._tg.start_soon(self._recycle, cg)
            elif not self._cgroups.recycle(cg):
                self.to_remove.append(cg)

    async def serve(self) -> None:
        """Release dead workers' groups until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                released, self._released = self._released, []
                for cg in released:
                    tg.start_soon(self._release, cg)
                await anyio.sleep_forever()
            finally:
                self._tg = None
