"""Admission under any sequence of submits, ends and cancels: the limits always hold, nothing
that could start waits, each principal's jobs start in order, and every job starts once the
others are done."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ARCPError
from supervisor.core.admission import Admission

MiB = 1024 * 1024
PRINCIPALS = ("alice", "bob", "carol")

ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from(PRINCIPALS), st.integers(1, 600)),
        st.tuples(st.just("end"), st.integers(0, 1000), st.just(0)),
    ),
    max_size=120,
)
configs = st.tuples(st.integers(1, 6), st.integers(100, 1500), st.integers(0, 20),
                    st.none() | st.integers(1, 4), st.dictionaries(st.sampled_from(PRINCIPALS), st.integers(1, 4)))


@settings(max_examples=300, deadline=None)
@given(configs, ops)
def test_admission_invariants(config: tuple[int, int, int, int | None, dict[str, int]],
                              steps: list[tuple[str, object, int]]) -> None:
    max_jobs, budget_mb, max_queued, quota, quotas = config
    a = Admission(max_jobs, budget_mb * MiB, max_queued, quota, quotas)
    owner: dict[str, str] = {}
    memory: dict[str, int] = {}
    running: set[str] = set()
    waiting: list[str] = []  # in submit order
    started_order: dict[str, list[str]] = {p: [] for p in PRINCIPALS}
    n = 0

    def started(keys: list[str]) -> None:
        for k in keys:
            assert k in waiting and k not in running
            waiting.remove(k)
            running.add(k)
            started_order[owner[k]].append(k)

    def check() -> None:
        assert len(running) == a.running <= max_jobs
        assert sum(memory[k] for k in running) == a.memory_in_use <= budget_mb * MiB
        for p in PRINCIPALS:
            cap = quotas.get(p, quota)
            assert cap is None or sum(1 for k in running if owner[k] == p) <= cap
        assert len(waiting) == a.queued
        # nothing waits that the rules would start: the first principal in turn that is under
        # its quota (if any) waits for capacity
        for k in waiting:
            assert a.position(k) is not None
        under = [p for p in a._queues if a._under_quota(p)]
        if under:
            head = a._queues[under[0]][0]
            assert len(running) == max_jobs or a.memory_in_use + head.memory > budget_mb * MiB

    for op, arg, size in steps:
        if op == "submit":
            key = f"j{n}"
            n += 1
            owner[key], memory[key] = str(arg), size * MiB
            try:
                a.check(str(arg), size * MiB)
            except ARCPError:
                refused = True
            else:
                refused = False
            try:
                waiting.append(key)
                started(a.submit(key, str(arg), size * MiB))
                assert not refused
            except ARCPError:
                waiting.remove(key)
                assert refused
                assert size > budget_mb or len(waiting) >= max_queued
        else:
            live = sorted(running) + waiting
            if live:
                key = live[int(str(arg)) % len(live)]
                if key in running:
                    running.discard(key)
                else:
                    waiting.remove(key)
                started(a.finish(key))
        check()
    # first in, first out within each principal
    for p, keys in started_order.items():
        assert keys == sorted(keys, key=lambda k: int(k[1:]))
    # and everything that waits starts once the others are done
    while running:
        key = min(running)
        running.discard(key)
        started(a.finish(key))
        check()
    assert not waiting and a.running == 0 and a.memory_in_use == 0
