"""supervisor/core/lifecycle.py: a job's life decided on a fake clock, no worker."""

from __future__ import annotations

import pytest

from shared.messages import CANCELLED, ERROR, TIMED_OUT
from supervisor.core.lifecycle import DONE, ENDING, RUNNING, STOPPING, WAITING, JobLifecycle, died_terminal

LIMITS = {"memory_mb": 256, "cpu_sec": 30}


def test_the_tighter_of_the_ceiling_and_max_runtime_sec_counts_from_admission() -> None:
    life = JobLifecycle(max_runtime=3600, max_runtime_sec=5, expires_at=None)
    d = life.admitted(now_mono=100.0)
    assert (d.at, d.kind) == (105.0, "timeout") and "max_runtime_sec=5" in d.error.message
    assert life.state == RUNNING
    d = JobLifecycle(max_runtime=10, max_runtime_sec=60, expires_at=None).admitted(100.0)
    assert d.at == 110.0 and d.error.details == {"limit": "runtime_sec", "value": 10}
    assert d.error.retryable is False
    d = JobLifecycle(max_runtime=10, max_runtime_sec=None, expires_at=None).admitted(0.0)
    assert d.at == 10.0


def test_the_lease_expiry_is_moved_onto_the_monotonic_clock() -> None:
    assert JobLifecycle(60, None, None).lease_deadline(now_wall=1000.0, now_mono=5.0) is None
    d = JobLifecycle(60, None, expires_at=1030.0).lease_deadline(now_wall=1000.0, now_mono=5.0)
    assert d is not None and (d.at, d.kind) == (35.0, "expired") and d.error.code == "LEASE_EXPIRED"
    past = JobLifecycle(60, None, expires_at=900.0).lease_deadline(now_wall=1000.0, now_mono=5.0)
    assert past is not None and past.at == 5.0  # already expired: at once


def test_a_job_stopped_while_waiting_ends_at_once() -> None:
    life = JobLifecycle(60, None, None)
    stop = life.request_stop("cancel", "no longer needed")
    assert stop is not None and stop.finish_now and stop.cancelled_frame
    assert stop.status == CANCELLED and stop.error["code"] == "CANCELLED"
    assert life.state == DONE


@pytest.mark.parametrize("kind,status,code", [("cancel", CANCELLED, "CANCELLED"), ("timeout", TIMED_OUT, "TIMEOUT"),
                                              ("expired", ERROR, "LEASE_EXPIRED")])
def test_a_running_job_stops_after_its_worker(kind: str, status: str, code: str) -> None:
    life = JobLifecycle(60, None, None)
    life.admitted(0.0)
    stop = life.request_stop(kind, "why")
    assert stop is not None and not stop.finish_now and stop.status == status and stop.error["code"] == code
    assert stop.cancelled_frame == (kind == "cancel")
    assert life.state == STOPPING and life.stopping


def test_the_first_stop_wins() -> None:
    life = JobLifecycle(60, None, None)
    life.admitted(0.0)
    first = life.request_stop("timeout", "too long")
    assert life.request_stop("cancel", "later") is None
    assert life.stop == first


def test_a_stop_after_the_end_was_reported_comes_too_late() -> None:
    life = JobLifecycle(60, None, None)
    life.admitted(0.0)
    assert life.end_reported() and life.state == ENDING
    assert life.request_stop("cancel", "late") is None and life.stop is None
    life.finished()
    assert life.request_stop("timeout", "late") is None


def test_an_end_reported_after_a_stop_does_not_stand() -> None:
    life = JobLifecycle(60, None, None)
    life.admitted(0.0)
    life.request_stop("cancel", "stop")
    assert not life.end_reported() and life.state == STOPPING


def test_a_given_error_replaces_the_kinds() -> None:
    from shared.errors import Timeout
    life = JobLifecycle(60, None, None)
    life.admitted(0.0)
    stop = life.request_stop("timeout", "x", Timeout("runtime limit 60 s exceeded", details={"limit": "runtime_sec"}))
    assert stop is not None and stop.error["details"] == {"limit": "runtime_sec"}


def test_an_unknown_stop_kind_is_a_bug() -> None:
    with pytest.raises(ValueError):
        JobLifecycle(60, None, None).request_stop("pause", "?")
    assert WAITING == JobLifecycle(60, None, None).state


def test_a_dead_worker_names_the_limit_it_passed_first() -> None:
    base = dict(memory_exceeded=False, oom=False, cpu_unreadable=None, cpu_exceeded=False, killed_by_sigxcpu=False,
                exit_reason="killed by SIGSEGV")
    status, err = died_terminal(LIMITS, **{**base, "oom": True, "cpu_exceeded": True})  # type: ignore[arg-type]
    assert status == ERROR and err["details"] == {"limit": "memory_mb", "value": 256, "enforced_by": "cgroup"}
    _, err = died_terminal(LIMITS, **{**base, "memory_exceeded": True})  # type: ignore[arg-type]
    assert err["details"]["enforced_by"] == "watchdog"
    status, err = died_terminal(LIMITS, **{**base, "killed_by_sigxcpu": True})  # type: ignore[arg-type]
    assert status == TIMED_OUT and err["details"] == {"limit": "cpu_sec", "value": 30}
    _, err = died_terminal(LIMITS, **{**base, "cpu_unreadable": ("cannot read", {"limit": "cpu_sec"})})  # type: ignore[arg-type]
    assert err["retryable"] is True and err["message"] == "cannot read"
    status, err = died_terminal(LIMITS, **base)  # type: ignore[arg-type]
    assert status == ERROR and err["retryable"] is True and err["details"] == {"exit": "killed by SIGSEGV"}
