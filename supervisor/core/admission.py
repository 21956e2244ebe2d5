"""Admission: which accepted jobs run now, and in what order the others start.

A pure state machine (no I/O, no clock): the runtime tells it of every job it
accepts (`submit`) and of every job that ends, running or still queued
(`finish`); each call returns the keys of the jobs to start now, in order.

What it enforces (contract.md "Admission: capacity, queue and quotas"):

- at most `max_jobs` jobs run at once, all principals together;
- the memory limits of the running jobs add up to at most `memory_budget`;
- a principal runs at most its quota (`quotas[principal]`, else `quota`,
  else no cap of its own);
- at most `max_queued` jobs wait: a job that would have to wait beyond that
  is refused (`InternalError`, retryable, details `{"reason": "overloaded"}`);
- a job whose memory limit alone is over the budget could never start: it is
  refused (`InvalidRequest`) instead of waiting forever.

Start order: first in, first out within a principal; between principals, in
turn: the principal whose last start is the oldest goes first (one with no job
running, that has not started one since, before any other). A principal at
its own quota passes its turn to the next. A job that does not fit the global
capacity (the job count, or the memory budget) keeps the turn until it does:
smaller jobs of other principals do not overtake it, so no job waits forever
behind a stream of smaller ones.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import InternalError, InvalidRequest

MiB = 1024 * 1024


@dataclass(frozen=True)
class _Entry:
    key: str
    principal: str
    memory: int


class Admission:
    def __init__(self, max_jobs: int, memory_budget: int, max_queued: int, quota: int | None = None,
                 quotas: Mapping[str, int] | None = None) -> None:
        self.max_jobs = max_jobs
        self.memory_budget = memory_budget
        self.max_queued = max_queued
        self.quota = quota
        self.quotas: dict[str, int] = dict(quotas or {})
        self._running: dict[str, _Entry] = {}
        self._per_principal: dict[str, int] = {}  # running jobs of each principal
        self._memory = 0  # the sum of the running jobs' memory limits
        # Principals with waiting jobs, least recently served first; each with its jobs in order.
        self._queues: OrderedDict[str, deque[_Entry]] = OrderedDict()
        self._queued: dict[str, _Entry] = {}
        # When each principal with running or waiting jobs last had one started (a count of starts).
        self._last_start: dict[str, int] = {}
        self._starts = 0

    # -- what the runtime reads ------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def memory_in_use(self) -> int:
        return self._memory

    def is_queued(self, key: str) -> bool:
        return key in self._queued

    def is_running(self, key: str) -> bool:
        return key in self._running

    def quota_of(self, principal: str) -> int | None:
        return self.quotas.get(principal, self.quota)

    def position(self, key: str) -> int | None:
        """1 for the job that starts next, and so on, if nothing else changes (principals in
        turn, quotas and capacity aside); None for a job that is not waiting."""
        entry = self._queued.get(key)
        if entry is None:
            return None
        principals = list(self._queues)
        mine = principals.index(entry.principal)
        q = self._queues[entry.principal]
        k = len(q) - 1 if q[-1] is entry else q.index(entry)  # the last, when it has just been queued
        ahead = k  # the principal's own earlier jobs
        for i, p in enumerate(principals):
            if i != mine:  # principals before it in turn start k + 1 jobs before it, those after k
                ahead += min(len(self._queues[p]), k + 1 if i < mine else k)
        return ahead + 1

    # -- checks before the runtime accepts a job -------------------------------------
    def check(self, principal: str, memory: int) -> None:
        """Raise what `submit` would raise for this job, changing nothing."""
        self.check_size(memory)
        if len(self._queued) >= self.max_queued and not self._would_start(principal, memory):
            raise InternalError(f"the server is overloaded: {len(self._queued)} jobs are already waiting to start",
                                retryable=True, details={"reason": "overloaded"})

    def check_size(self, memory: int) -> None:
        """A job larger than the memory budget on its own is refused: it could never start."""
        if memory > self.memory_budget:
            raise InvalidRequest(
                f"memory_mb {memory // MiB} is over the server's memory budget of "
                f"{self.memory_budget // MiB} MiB (all running jobs together): this job could never start",
                details={"limit": "memory_mb", "value": memory // MiB,
                         "memory_budget_mb": self.memory_budget // MiB})

    def _would_start(self, principal: str, memory: int) -> bool:
        if principal in self._queues or not self._under_quota(principal):
            return False
        # Every principal still waiting and under its quota waits for capacity, and goes first.
        if any(self._under_quota(p) for p in self._queues):
            return False
        return self._fits(memory)

    # -- events -----------------------------------------------------------------
    def submit(self, key: str, principal: str, memory: int) -> list[str]:
        """A job was accepted: queue it; the jobs to start now (this one among them, if it can)."""
        if key in self._queued or key in self._running:
            raise ValueError(f"job {key} is already known")
        self.check(principal, memory)
        entry = _Entry(key, principal, memory)
        if principal not in self._queues:
            self._take_turn(principal)
        self._queues[principal].append(entry)
        self._queued[key] = entry
        return self._pump()

    def finish(self, key: str) -> list[str]:
        """A job ended, whether it ran or was still waiting (a cancel, an expired lease):
        the jobs to start now. Unknown keys are ignored."""
        entry = self._running.pop(key, None)
        if entry is not None:
            self._memory -= entry.memory
            n = self._per_principal[entry.principal] - 1
            if n:
                self._per_principal[entry.principal] = n
            else:
                del self._per_principal[entry.principal]
                self._forget(entry.principal)
            return self._pump()
        entry = self._queued.pop(key, None)
        if entry is None:
            return []
        q = self._queues[entry.principal]
        q.remove(entry)
        if not q:
            del self._queues[entry.principal]
            self._forget(entry.principal)
        return self._pump()  # it may have held the turn of jobs that fit

    cancel = finish

    def configure(self, max_jobs: int, memory_budget: int, max_queued: int, quota: int | None = None,
                  quotas: Mapping[str, int] | None = None) -> list[str]:
        """New limits (a reloaded configuration) for the jobs that start from now on; running
        jobs are never stopped for them. The jobs to start now."""
        self.max_jobs, self.memory_budget, self.max_queued = max_jobs, memory_budget, max_queued
        self.quota, self.quotas = quota, dict(quotas or {})
        return self._pump()

    # -- the rules ---------------------------------------------------------------
    def _take_turn(self, principal: str) -> None:
        """A principal starts waiting: its place in the turn order, after those served less
        recently than it (first of all if it has no job running), before the others."""
        last = self._last_start.get(principal, -1)
        queues = self._queues
        if not queues or self._last_start.get(next(reversed(queues)), -1) <= last:
            queues[principal] = deque()
            return
        items = list(queues.items())
        at = next(i for i, (p, _) in enumerate(items) if self._last_start.get(p, -1) > last)
        items.insert(at, (principal, deque()))
        self._queues = OrderedDict(items)

    def _forget(self, principal: str) -> None:
        """Nothing of it runs or waits: it starts afresh (first in turn) when it comes back."""
        if principal not in self._queues and principal not in self._per_principal:
            self._last_start.pop(principal, None)

    def _under_quota(self, principal: str) -> bool:
        cap = self.quota_of(principal)
        return cap is None or self._per_principal.get(principal, 0) < cap

    def _fits(self, memory: int) -> bool:
        return len(self._running) < self.max_jobs and self._memory + memory <= self.memory_budget

    def _pump(self) -> list[str]:
        started: list[str] = []
        while len(self._running) < self.max_jobs:
            turn = next((p for p in self._queues if self._under_quota(p)), None)
            if turn is None:
                break  # nobody waits, or everyone waiting is at its quota
            q = self._queues[turn]
            head = q[0]
            if not self._fits(head.memory):
                break  # it keeps the turn until it fits
            q.popleft()
            del self._queued[head.key]
            if q:
                self._queues.move_to_end(turn)  # served: to the back of the turn order
            else:
                del self._queues[turn]
            self._running[head.key] = head
            self._per_principal[turn] = self._per_principal.get(turn, 0) + 1
            self._memory += head.memory
            self._starts += 1
            self._last_start[turn] = self._starts
            started.append(head.key)
        return started


__all__ = ["Admission"]
