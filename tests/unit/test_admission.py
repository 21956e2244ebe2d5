"""supervisor/admission.py: capacity, memory budget, quotas, the queue and its order; no I/O.

The simulations drive it with a fake clock: jobs of known durations, and time
moved from one job end to the next.
"""

from __future__ import annotations

import heapq
import itertools

import pytest

from shared.errors import InternalError, InvalidRequest
from supervisor.core.admission import Admission

MiB = 1024 * 1024
GB = 1024 * MiB


def adm(max_jobs: int = 8, budget: int = 100 * GB, max_queued: int = 10000, quota: int | None = None,
        quotas: dict[str, int] | None = None) -> Admission:
    return Admission(max_jobs, budget, max_queued, quota, quotas)


def submit_all(a: Admission, principal: str, keys: list[str], memory: int = MiB) -> list[str]:
    started: list[str] = []
    for k in keys:
        started += a.submit(k, principal, memory)
    return started


# -- capacity -------------------------------------------------------------------------------------------

def test_max_jobs_runs_that_many_and_starts_the_rest_in_order() -> None:
    a = adm(max_jobs=3)
    keys = [f"j{i}" for i in range(6)]
    assert submit_all(a, "alice", keys) == ["j0", "j1", "j2"]
    assert (a.running, a.queued) == (3, 3)
    assert [a.position(k) for k in keys] == [None, None, None, 1, 2, 3]
    assert a.finish("j1") == ["j3"]
    assert a.finish("j0") == ["j4"]
    assert a.finish("j4") == ["j5"]
    assert a.finish("j2") == [] and a.finish("j3") == [] and a.finish("j5") == []
    assert (a.running, a.queued, a.memory_in_use) == (0, 0, 0)


def test_memory_budget_caps_the_sum_of_running_limits() -> None:
    a = adm(max_jobs=100, budget=512 * MiB)
    assert submit_all(a, "alice", ["a", "b", "c", "d"], memory=200 * MiB) == ["a", "b"]
    assert a.memory_in_use == 400 * MiB
    assert a.finish("a") == ["c"]
    assert a.finish("b") == ["d"]
    assert a.submit("small", "alice", 100 * MiB) == ["small"]  # fits beside c and d, nobody waits


def test_a_job_larger_than_the_budget_is_refused_naming_memory_mb_and_the_budget() -> None:
    a = adm(budget=512 * MiB)
    with pytest.raises(InvalidRequest) as ei:
        a.submit("big", "alice", 600 * MiB)
    msg = ei.value.message
    assert "memory_mb 600" in msg and "512 MiB" in msg
    assert ei.value.details == {"limit": "memory_mb", "value": 600, "memory_budget_mb": 512}
    assert (a.running, a.queued) == (0, 0)
    assert a.submit("exact", "alice", 512 * MiB) == ["exact"]


def test_a_job_that_does_not_fit_keeps_its_turn_over_smaller_ones() -> None:
    """Nobody overtakes a job waiting for memory: it would wait forever behind small ones."""
    a = adm(max_jobs=100, budget=1000 * MiB)
    assert a.submit("b1", "bob", 600 * MiB) == ["b1"]
    assert a.submit("big", "alice", 500 * MiB) == []  # 600 + 500 > 1000
    assert a.submit("b2", "bob", 100 * MiB) == []  # would fit, but alice's job has the turn
    assert a.submit("c1", "carol", 100 * MiB) == []
    assert a.finish("b1") == ["big", "c1", "b2"]  # carol, never served, before bob


# -- order between principals ---------------------------------------------------------------------------

def test_principals_take_turns_and_each_is_first_in_first_out() -> None:
    a = adm(max_jobs=1)
    assert a.submit("busy", "zed", MiB) == ["busy"]
    submit_all(a, "alice", ["a1", "a2", "a3"])
    submit_all(a, "bob", ["b1", "b2"])
    submit_all(a, "carol", ["c1"])
    order = []
    running = "busy"
    while True:
        started = a.finish(running)
        if not started:
            break
        (running,) = started
        order.append(running)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]


def test_one_principals_flood_does_not_delay_another_beyond_one_slot() -> None:
    a = adm(max_jobs=8)
    flood = [f"a{i}" for i in range(300)]
    assert submit_all(a, "alice", flood) == flood[:8]
    assert a.submit("bob1", "bob", MiB) == []
    assert a.position("bob1") == 1
    assert a.finish("a0") == ["bob1"]


def test_positions_follow_the_turns() -> None:
    a = adm(max_jobs=1)
    a.submit("busy", "zed", MiB)
    submit_all(a, "alice", ["a1", "a2", "a3"])
    submit_all(a, "bob", ["b1"])
    # turns: a1, b1, a2, a3
    assert [a.position(k) for k in ("a1", "b1", "a2", "a3")] == [1, 2, 3, 4]
    a.submit("b2", "bob", MiB)  # after a2 (bob's second turn comes after alice's second)
    assert a.position("b2") == 4 and a.position("a3") == 5
    assert a.position("busy") is None and a.position("nope") is None


# -- quotas ------------------------------------------------------------------------------------------------

def test_quota_caps_each_principal_and_others_pass_it() -> None:
    a = adm(max_jobs=10, quota=2, quotas={"bob": 3})
    assert submit_all(a, "alice", ["a1", "a2", "a3", "a4"]) == ["a1", "a2"]
    assert submit_all(a, "bob", ["b1", "b2", "b3", "b4"]) == ["b1", "b2", "b3"]
    assert a.submit("c1", "carol", MiB) == ["c1"]  # alice and bob wait at their quotas, not for capacity
    assert a.quota_of("bob") == 3 and a.quota_of("carol") == 2
    assert a.finish("b1") == ["b4"]
    assert a.finish("a2") == ["a3"]
    assert a.finish("c1") == []


def test_a_principal_at_its_quota_passes_its_turn() -> None:
    a = adm(max_jobs=2, quota=1)
    assert submit_all(a, "alice", ["a1", "a2"]) == ["a1"]
    assert a.submit("b1", "bob", MiB) == ["b1"]
    assert a.submit("c1", "carol", MiB) == []  # capacity: 2 running
    assert a.finish("b1") == ["c1"]  # alice had the turn, but is at her quota


# -- the queue bound -------------------------------------------------------------------------------------

def test_beyond_max_queued_submits_are_refused_as_overloaded() -> None:
    a = adm(max_jobs=1, max_queued=2, quota=1)
    submit_all(a, "alice", ["a1", "a2", "a3"])
    assert a.queued == 2
    with pytest.raises(InternalError) as ei:
        a.submit("a4", "alice", MiB)
    assert ei.value.retryable is True and ei.value.details == {"reason": "overloaded"}
    with pytest.raises(InternalError):
        a.check("bob", MiB)
    assert a.queued == 2 and not a.is_queued("a4")


def test_a_job_that_can_start_at_once_is_taken_even_with_a_full_queue() -> None:
    a = adm(max_jobs=5, max_queued=1, quota=1)
    submit_all(a, "alice", ["a1", "a2"])  # a2 waits for alice's quota: the queue is full
    a.check("bob", MiB)
    assert a.submit("b1", "bob", MiB) == ["b1"]


def test_max_queued_zero_means_nothing_waits() -> None:
    a = adm(max_jobs=1, max_queued=0)
    assert a.submit("a1", "alice", MiB) == ["a1"]
    with pytest.raises(InternalError):
        a.submit("a2", "alice", MiB)


# -- cancel and reconfigure ------------------------------------------------------------------------------

def test_cancelling_a_queued_job_removes_it_and_keeps_the_order() -> None:
    a = adm(max_jobs=1)
    submit_all(a, "alice", ["a1", "a2", "a3", "a4"])
    assert a.cancel("a3") == []
    assert not a.is_queued("a3") and a.position("a4") == 2
    assert a.finish("a1") == ["a2"]
    assert a.finish("a2") == ["a4"]
    assert a.finish("a3") == []  # already gone: ignored


def test_cancelling_the_job_that_held_the_turn_lets_others_start() -> None:
    a = adm(max_jobs=10, budget=1000 * MiB)
    a.submit("b1", "bob", 600 * MiB)
    a.submit("big", "alice", 500 * MiB)
    a.submit("c1", "carol", 100 * MiB)
    assert a.cancel("big") == ["c1"]


def test_configure_applies_to_jobs_that_start_from_now_on() -> None:
    a = adm(max_jobs=1)
    submit_all(a, "alice", ["a1", "a2", "a3"])
    assert a.configure(3, 100 * GB, 10) == ["a2", "a3"]
    submit_all(a, "alice", ["a4"])
    assert a.configure(1, 100 * GB, 10, quota=1) == []  # nothing running is stopped
    assert a.running == 3 and a.position("a4") == 1


def test_the_same_key_twice_is_a_bug() -> None:
    a = adm()
    a.submit("a1", "alice", MiB)
    with pytest.raises(ValueError):
        a.submit("a1", "alice", MiB)


# -- simulations with a fake clock -----------------------------------------------------------------------

class Clocked:
    """Jobs of known durations on a fake clock: each start schedules its end."""

    def __init__(self, a: Admission) -> None:
        self.a = a
        self.now = 0.0
        self.ends: list[tuple[float, int, str]] = []
        self.tie = itertools.count()
        self.durations: dict[str, float] = {}
        self.started_at: dict[str, float] = {}
        self.submitted_at: dict[str, float] = {}
        self.peak = 0
        self.peak_memory = 0
        self.owner: dict[str, str] = {}
        self.running: set[str] = set()
        self.peak_of: dict[str, int] = {}

    def _started(self, keys: list[str]) -> None:
        for k in keys:
            self.started_at[k] = self.now
            heapq.heappush(self.ends, (self.now + self.durations[k], next(self.tie), k))
            self.running.add(k)
            p = self.owner[k]
            self.peak_of[p] = max(self.peak_of.get(p, 0), sum(1 for r in self.running if self.owner[r] == p))
        self.peak = max(self.peak, self.a.running)
        self.peak_memory = max(self.peak_memory, self.a.memory_in_use)

    def submit(self, key: str, principal: str, duration: float, memory: int = MiB) -> None:
        self.durations[key] = duration
        self.owner[key] = principal
        self.submitted_at[key] = self.now
        self._started(self.a.submit(key, principal, memory))

    def run_until(self, t: float) -> None:
        while self.ends and self.ends[0][0] <= t:
            self.now, _, k = heapq.heappop(self.ends)
            self.running.discard(k)
            self._started(self.a.finish(k))
        self.now = max(self.now, t)

    def run_all(self) -> None:
        while self.ends:
            self.run_until(self.ends[0][0])


def test_simulated_flood_and_a_second_principal() -> None:
    """300 jobs of 0.2 s from alice under --max-jobs 8; bob's one job, submitted a little
    later, starts within one job's time and long before the flood is through."""
    sim = Clocked(adm(max_jobs=8))
    for i in range(300):
        sim.submit(f"a{i}", "alice", 0.2)
    sim.run_until(0.05)
    sim.submit("bob", "bob", 0.2)
    sim.run_all()
    assert sim.peak == 8
    assert sim.started_at["bob"] - sim.submitted_at["bob"] <= 0.2
    assert sim.now == pytest.approx(300 * 0.2 / 8 + 0.2, abs=0.21)
    alice = [sim.started_at[f"a{i}"] for i in range(300)]
    assert alice == sorted(alice), "first in, first out within a principal"


def test_simulated_memory_budget_and_quotas_hold_throughout() -> None:
    sim = Clocked(adm(max_jobs=50, budget=2000 * MiB, quota=3, quotas={"bob": 5}))
    for i in range(40):
        for p, mem in (("alice", 300 * MiB), ("bob", 200 * MiB), ("carol", 700 * MiB)):
            sim.submit(f"{p}{i}", p, 0.1 + (i % 3) * 0.05, mem)
        sim.run_until(sim.now + 0.03)
    sim.run_all()
    assert sim.peak_memory <= 2000 * MiB
    assert sim.peak_of["alice"] <= 3 and sim.peak_of["bob"] <= 5 and sim.peak_of["carol"] <= 2
    assert len(sim.started_at) == 120 and sim.a.running == 0 and sim.a.queued == 0
