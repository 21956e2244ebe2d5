"""What a job used: wall time, CPU time, peak memory and tasks of its whole process tree,
and the bytes its egress proxy moved (contract.md "Usage accounting").

The kernel measures it. Where the worker has a cgroup, its counters are read: CPU time
(`cpuacct` in v1, `cpu.stat` in v2), the memory high-water mark (v1
`memory.max_usage_in_bytes`, set afresh when the job starts), and the task count
(`pids.current`, sampled while the job runs, with `pids.peak` where the kernel keeps one).
Groups and workers are recycled, so each figure counts from the job's start: CPU time is
the counter less what it held then, and a high-water mark that cannot be set afresh counts
only if it rose during the job. Whatever the group cannot tell comes from the worker's
process tree as the watchdog samples it (resident memory, processes and threads, and their
CPU time, reaped children included).

The figures go on every terminal frame, in the envelope's `extensions` and as a payload
field, under `USAGE_KEY`, and on `session.list_jobs` entries (so far, for a running job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil

from shared.messages import CANCELLED, SUCCESS, TIMED_OUT
from supervisor.sandbox.worker_cgroup import WorkerCgroup
from supervisor.core.frames import USAGE_KEY

MiB = 1 << 20


def usage_wire(wall_s: float = 0.0, cpu_user_s: float = 0.0, cpu_sys_s: float = 0.0, memory_peak: int = 0,
               procs_peak: int = 0, net_bytes_in: int = 0, net_bytes_out: int = 0) -> dict[str, Any]:
    """The usage object as clients read it (memory in bytes here, MiB on the wire)."""
    return {"wall_s": round(max(0.0, wall_s), 3), "cpu_user_s": round(max(0.0, cpu_user_s), 3),
            "cpu_sys_s": round(max(0.0, cpu_sys_s), 3), "memory_peak_mb": round(max(0, memory_peak) / MiB, 1),
            "procs_peak": max(0, procs_peak), "net_bytes_in": max(0, net_bytes_in),
            "net_bytes_out": max(0, net_bytes_out)}


def outcome_of(status: str, error: dict[str, Any] | None) -> str:
    """How a job ended, in one word: success, error, cancelled, timeout, or limit (a limit
    of its own ended it: memory, CPU time, runtime, or a refusal the kernel made for one)."""
    details = (error or {}).get("details")
    if isinstance(details, dict) and "limit" in details and "layer" not in details:
        return "limit"  # ("layer": a limit that could not be applied, not one the job hit)
    if status == SUCCESS:
        return "success"
    if status == CANCELLED:
        return "cancelled"
    if status == TIMED_OUT or (error or {}).get("code") == "TIMEOUT":
        return "timeout"
    return "error"


@dataclass(frozen=True)
class TreeSample:
    """The worker's process tree at one moment, as the watchdog reads it from /proc."""

    rss: int  # bytes resident, summed over the tree
    tasks: int  # processes and their threads
    cpu_user_s: float  # the live processes' CPU time and that of the children they reaped
    cpu_sys_s: float


def sample_tree(pid: int) -> TreeSample | None:
    """The tree below (and with) `pid`; None once the worker is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return None
    rss = tasks = 0
    user = system = 0.0
    for i, proc in enumerate(procs):
        try:
            with proc.oneshot():
                rss += proc.memory_info().rss
                tasks += proc.num_threads()
                t = proc.cpu_times()
        except psutil.Error:
            if i == 0:
                return None
            continue  # a child that ended meanwhile: its time is its parent's once reaped
        user += t.user + t.children_user
        system += t.system + t.children_system
    return TreeSample(rss, tasks, user, system)


class UsageMeter:
    """One job's usage on its worker, from its start (`started`, monotonic) to its end."""

    def __init__(self, cgroup: WorkerCgroup | None, pid: int, started: float) -> None:
        self.cgroup = cgroup
        self.pid = pid
        self.started = started
        self.cpu_by_cgroup = cgroup is not None and cgroup.counts_cpu
        self.memory_by_cgroup = cgroup is not None and cgroup.limits_memory
        self.procs_by_cgroup = False
        self._cpu_base = 0  # the group's CPU time (ns) and its user/system split at the start
        self._split_base = (0, 0)
        self._memory_reset = False  # the group's high-water mark was set afresh at the start
        self._memory_peak_base: int | None = None  # else: what it was then (it counts if it rose)
        self._pids_peak_base: int | None = None
        self._memory_seen = 0  # the largest sample (bytes)
        self._tasks_seen = 0
        self._tree_base: TreeSample | None = None
        self._tree: TreeSample | None = None  # the latest sample of the tree
        self._cpu = (0.0, 0.0)  # the latest CPU figures read (kept if a later read fails)

    @property
    def needs_tree(self) -> bool:
        """Some figure is not the group's: the poll samples the worker's process tree."""
        return not (self.cpu_by_cgroup and self.memory_by_cgroup and self.procs_by_cgroup)

    def begin(self, cpu_base_ns: int | None = None) -> None:
        """At the job's start, before its worker is given the job: the counters' values now."""
        cg = self.cgroup
        if cg is not None:
            if self.cpu_by_cgroup:
                try:
                    self._cpu_base = cg.cpu_usage_ns() if cpu_base_ns is None else cpu_base_ns
                    self._split_base = cg.cpu_split()
                except (OSError, ValueError):
                    self.cpu_by_cgroup = False
            if self.memory_by_cgroup:
                self._memory_reset = cg.reset_memory_peak()
                if not self._memory_reset:
                    self._memory_peak_base = cg.memory_peak()
                    if self._memory_peak_base is None and cg.memory_current() is None:
                        self.memory_by_cgroup = False
            current = cg.pids_current()
            if current is not None:
                self.procs_by_cgroup = True
                self._tasks_seen = current
                self._pids_peak_base = cg.pids_peak()
        if self.needs_tree:
            self._tree_base = self._tree = sample_tree(self.pid)

    def sample(self, tree: TreeSample | None = None) -> None:
        """One look while the job runs (the runner's 100 ms poll): the task count, the memory
        where no high-water mark serves, and the process tree's sample if it took one."""
        cg = self.cgroup
        if cg is not None and self.procs_by_cgroup:
            n = cg.pids_current()
            if n is not None:
                self._tasks_seen = max(self._tasks_seen, n)
        if cg is not None and self.memory_by_cgroup and not self._memory_reset:
            m = cg.memory_current()
            if m is not None:
                self._memory_seen = max(self._memory_seen, m)
        if tree is not None:
            self._tree = tree
            if not self.memory_by_cgroup:
                self._memory_seen = max(self._memory_seen, tree.rss)
            if not self.procs_by_cgroup:
                self._tasks_seen = max(self._tasks_seen, tree.tasks)

    def read(self, now: float, net_in: int = 0, net_out: int = 0) -> dict[str, Any]:
        """The figures so far (at the end: the job's usage), as `usage_wire` gives them."""
        return usage_wire(now - self.started, *self._cpu_now(), self._memory_peak(), self._procs_peak(),
                          net_in, net_out)

    def _cpu_now(self) -> tuple[float, float]:
        cg = self.cgroup
        if cg is not None and self.cpu_by_cgroup:
            try:
                total = (cg.cpu_usage_ns() - self._cpu_base) / 1e9
                user, system = cg.cpu_split()
            except (OSError, ValueError):
                return self._cpu  # unreadable now (the group is going): the last figures read
            du, ds = user - self._split_base[0], system - self._split_base[1]
            # The total is the scheduler's exact count; the kernel's user/system split of it
            # is coarser (ticks in v1), so it only apportions the total.
            u = total * du / (du + ds) if du + ds > 0 else total
            self._cpu = (u, total - u)
        elif self._tree is not None and self._tree_base is not None:
            self._cpu = (self._tree.cpu_user_s - self._tree_base.cpu_user_s,
                         self._tree.cpu_sys_s - self._tree_base.cpu_sys_s)
        return self._cpu

    def _memory_peak(self) -> int:
        cg = self.cgroup
        peak = self._memory_seen
        if cg is not None and self.memory_by_cgroup:
            mark = cg.memory_peak()
            if mark is not None and (self._memory_reset or (self._memory_peak_base is not None
                                                            and mark > self._memory_peak_base)):
                peak = max(peak, mark)
        return peak

    def _procs_peak(self) -> int:
        cg = self.cgroup
        peak = self._tasks_seen
        if cg is not None and self.procs_by_cgroup and self._pids_peak_base is not None:
            mark = cg.pids_peak()
            if mark is not None and mark > self._pids_peak_base:  # reached during this job
                peak = max(peak, mark)
        return peak


__all__ = ["USAGE_KEY", "TreeSample", "UsageMeter", "outcome_of", "sample_tree", "usage_wire"]
