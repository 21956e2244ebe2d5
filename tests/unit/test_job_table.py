"""supervisor/core/jobs.py's JobTable: retention by count and by age, on a clock passed in."""

from __future__ import annotations

from supervisor.core.authority import Authority
from supervisor.core.jobs import Job, JobTable


def _job(n: int, key: str | None = None) -> Job:
    return Job(id=f"job_{n}", principal="alice", owner_id="sess_1", agent_ref="echo@1", trace_id="t",
               created_at="2026-11-29T00:00:00Z", lease={}, lease_constraints={}, parent_job_id=None,
               idempotency_key=key, fingerprint=b"fp" if key else None, authority=Authority({}, None), accepted={})


def test_the_oldest_finished_jobs_go_past_the_count() -> None:
    table = JobTable(retention_jobs=2, retention_seconds=3600)
    for n in range(3):
        table.add(_job(n, key=f"k{n}"))
    assert table.finished_job(table.jobs["job_0"], now_mono=10.0) == []
    assert table.finished_job(table.jobs["job_1"], now_mono=11.0) == []
    assert table.finished_job(table.jobs["job_2"], now_mono=12.0) == ["job_0"]
    assert set(table.jobs) == {"job_1", "job_2"}
    assert ("alice", "k0") not in table.idempotency and ("alice", "k1") in table.idempotency


def test_finished_jobs_go_once_older_than_retention_on_the_clock_given() -> None:
    table = JobTable(retention_jobs=100, retention_seconds=60)
    for n in range(2):
        table.add(_job(n))
    table.finished_job(table.jobs["job_0"], now_mono=100.0)
    table.finished_job(table.jobs["job_1"], now_mono=130.0)
    assert table.expire(now_mono=159.9) == []
    assert table.expire(now_mono=160.0) == ["job_0"]
    assert table.expire(now_mono=189.9) == [] and table.expire(now_mono=190.0) == ["job_1"]
    assert table.jobs == {}
