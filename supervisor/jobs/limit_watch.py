"""A job's limits on its worker: applied to the worker's cgroup at start, then watched.

The kernel holds the memory and process limits where the worker has a memory and a pids
cgroup (written and read back when the job starts). The rest is the watch's: every
POLL_INTERVAL while the job runs it looks at the resident size of the job's process tree
where no memory cgroup holds the memory limit, at the CPU time of the whole tree (from its
cgroup, counted from what the group had used when the job started: a recycled group has run
others), and takes the job's usage samples. A limit passed kills the worker; what the watch
found (a limit passed, the CPU time no longer readable) names the terminal of the worker
that died (core/lifecycle.py `died_terminal`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from supervisor.core.usage import sample_tree
from supervisor.sandbox.worker_cgroup import LimitNotApplied

if TYPE_CHECKING:
    from supervisor.core.jobs import Job, SubmitRequest
    from supervisor.core.lifecycle import JobLifecycle
    from supervisor.core.usage import TreeSample, UsageMeter
    from supervisor.jobs.worker_handle import WorkerHandle
    from supervisor.sandbox.worker_cgroup import WorkerCgroup

log = logging.getLogger("arcp.jobs")
POLL_INTERVAL = 0.1  # seconds between looks at a running job: limits the kernel does not hold alone, usage


def limit_fields(job_id: str, key: str, value: Any) -> dict[str, Any]:
    """The log record's fields of a job ended by a limit."""
    return {"job_id": job_id, "limit": key, "value": value}


class LimitWatch:
    """One job's limits that the supervisor holds itself, and what became of them."""

    def __init__(self, job: Job, request: SubmitRequest, life: JobLifecycle, pump_done: asyncio.Event) -> None:
        self.job = job
        self.request = request
        self.life = life  # once a stop is decided, the CPU time no longer ends the job
        self.pump_done = pump_done  # nor once the worker has reported its end
        self.logged = False  # a limit kill was logged when it happened
        self.memory_exceeded = False
        self.cpu_base = 0  # the group's CPU time (ns) when the job started: a recycled group has run others
        self.cpu_exceeded = False
        self.cpu_unreadable: LimitNotApplied | None = None
        self._timer: asyncio.TimerHandle | None = None  # the next look, as a timer's callback
        self._scope: anyio.CancelScope | None = None  # or the watch's task, where it walks the tree

    def apply(self, worker: WorkerHandle, cg: WorkerCgroup) -> bool:
        """On a thread: the job's memory and process limits in the worker's group, and the
        group's CPU time now; whether the watch must hold the memory limit (no memory cgroup).
        LimitNotApplied when a limit does not hold or the CPU time cannot be read."""
        cg.set_limits(self.request.limits.memory, self.request.limits.max_procs)
        if cg.counts_cpu:  # CPU time of the whole tree; RLIMIT_CPU stays, per process
            try:
                self.cpu_base = cg.cpu_usage_ns()
            except (OSError, ValueError) as e:
                raise self.cpu_limit_error(worker, e) from None
        return not cg.limits_memory

    def start(self, tasks: TaskGroup, worker: WorkerHandle, meter: UsageMeter | None, watch_memory: bool) -> None:
        """Watch the job until `stop()`. Where every figure comes from the worker's group (a
        pread of a counter: about 2 µs) the look is a timer's callback on the loop; where the
        process tree must be walked (psutil reads /proc: milliseconds, on a thread) it is a
        task of `tasks` (the job's), in a cancel scope of its own."""
        if watch_memory or (meter is not None and meter.needs_tree):
            self._scope = anyio.CancelScope()
            tasks.start_soon(self.run, worker, meter, watch_memory, self._scope, name=f"watch {self.job.id}")
        else:
            self._arm(worker, meter)

    def stop(self) -> None:
        """The job's worker runs nothing of the job any more: no further look."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None

    def _arm(self, worker: WorkerHandle, meter: UsageMeter | None) -> None:
        self._timer = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._tick, worker, meter)

    def _tick(self, worker: WorkerHandle, meter: UsageMeter | None) -> None:
        self._timer = None
        try:
            if not worker.alive or self.job.done or self.pump_done.is_set():
                return
            if not self._look(worker, meter, None, False):
                self._arm(worker, meter)
        except Exception:  # the job goes on; its limits stay with the kernel's own layers
            log.exception("job %s: the watch failed", self.job.id)

    async def run(self, worker: WorkerHandle, meter: UsageMeter | None, watch_memory: bool,
                  scope: anyio.CancelScope) -> None:
        """Every POLL_INTERVAL while the job runs: the process tree's sample (on a thread), then
        the look (`_look`)."""
        try:
            with scope:
                while True:
                    await anyio.sleep(POLL_INTERVAL)
                    if not worker.alive or self.job.done:
                        return
                    tree = await anyio.to_thread.run_sync(sample_tree, worker.pid)
                    await anyio.lowlevel.checkpoint_if_cancelled()  # the pump has ended meanwhile
                    if not worker.alive or self.job.done:
                        return
                    if self._look(worker, meter, tree, watch_memory):
                        return
        except Exception:  # the job goes on; its limits stay with the kernel's own layers
            log.exception("job %s: the watch failed", self.job.id)

    def _look(self, worker: WorkerHandle, meter: UsageMeter | None, tree: TreeSample | None,
              watch_memory: bool) -> bool:
        """One look: the memory limit where no memory cgroup holds it (`watch_memory`, from the
        tree's sample), the CPU time limit of the whole tree (from its cgroup), the usage
        samples. True when a limit was passed and the worker killed: the watch is over."""
        if watch_memory and tree is not None and self.memory_over(worker, tree.rss):
            return True
        cg = worker.cgroup
        if cg is not None and cg.counts_cpu and not self.life.stopping and not self.pump_done.is_set() \
                and self.cpu_over(worker):
            worker.signal(signal.SIGKILL)  # the worker's group and every task of its cgroup
            return True
        if meter is not None:
            meter.sample(tree)
        return False

    def memory_over(self, worker: WorkerHandle, rss: int) -> bool:
        """The last line for the memory limit: the resident size of the job's process tree."""
        limit = self.request.limits.memory
        if rss <= limit:
            return False
        log.warning("job %s: %d MiB resident, over its %d MiB limit: killing it", self.job.id, rss >> 20,
                    limit >> 20, extra=limit_fields(self.job.id, "memory_mb", limit >> 20))
        self.logged = True
        self.memory_exceeded = True
        worker.signal(signal.SIGKILL)
        return True

    def cpu_over(self, worker: WorkerHandle) -> bool:
        """Has the job's tree used more CPU time than its limit (or can that no longer be told)?"""
        if self.cpu_exceeded or self.cpu_unreadable is not None:
            return True
        cg = worker.cgroup
        if cg is None or not cg.counts_cpu:
            return False
        limit = self.request.limits.cpu_time
        try:
            used = cg.cpu_usage_ns() - self.cpu_base
        except (OSError, ValueError) as e:
            self.cpu_unreadable = self.cpu_limit_error(worker, e)
            cg.retired = True
            log.error("job %s: %s; killing it", self.job.id, self.cpu_unreadable)
            return True
        if used > limit * 1_000_000_000:
            log.warning("job %s: %.2f s of CPU time in its process tree, over its %d s limit: killing it",
                        self.job.id, used / 1e9, limit, extra=limit_fields(self.job.id, "cpu_sec", limit))
            self.logged = True
            self.cpu_exceeded = True
            return True
        return False

    def cpu_limit_error(self, worker: WorkerHandle, e: Exception) -> LimitNotApplied:
        assert worker.cgroup is not None
        why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        return LimitNotApplied("cpu_sec", self.request.limits.cpu_time, worker.cgroup.cpu_layer,
                               f"its CPU time cannot be read: {why}")
