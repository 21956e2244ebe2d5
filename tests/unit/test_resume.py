"""supervisor/core/resume.py: a resume request checked against the session table's state, on a
fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from shared.envelope import Envelope
from shared.errors import InvalidRequest, ResumeWindowExpired, Unauthenticated
from supervisor.core.resume import check_log_kept, check_resume, resume_request, window_passed
from supervisor.core.session import Session, SessionSettings

NOW = 5000.0
WINDOW = 600.0


def _session(detached_at: float | None = NOW - 10, seq: int = 7) -> Session:
    settings = SessionSettings(resume_window=WINDOW, heartbeat_interval=30, back_pressure_threshold=0,
                               log_bytes=1 << 20, frame_cap=1 << 20)
    s = Session(settings, "alice", "python", [], lambda *row: None, lambda code, reason: None, NOW - 100)
    s.seq = seq
    if detached_at is not None:
        s.detach(detached_at)
    return s


def _hello(resume: Any) -> Envelope:
    return Envelope(type="session.hello", id="h1", payload={"resume": resume})


def test_resume_request_fields() -> None:
    assert resume_request(_hello({"session_id": "s", "resume_token": "t", "last_event_seq": 3})) == ("s", "t", 3)
    assert resume_request(_hello({"session_id": "s", "resume_token": "t", "last_event_seq": None}))[2] == 0
    assert resume_request(_hello({"session_id": "s", "resume_token": "t"}))[2] == 0


@pytest.mark.parametrize("resume,error", [
    ("s", InvalidRequest), ({"resume_token": "t"}, InvalidRequest), ({"session_id": 5}, InvalidRequest),
    ({"session_id": "s"}, Unauthenticated), ({"session_id": "s", "resume_token": 1}, Unauthenticated),
    ({"session_id": "s", "resume_token": "t", "last_event_seq": -1}, InvalidRequest),
    ({"session_id": "s", "resume_token": "t", "last_event_seq": True}, InvalidRequest),
    ({"session_id": "s", "resume_token": "t", "last_event_seq": "3"}, InvalidRequest),
])
def test_resume_request_refused(resume: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        resume_request(_hello(resume))


def test_a_detached_session_within_its_window_resumes() -> None:
    s = _session()
    assert check_resume(s, s.id, s.resume_token, 7, "alice", NOW, WINDOW, False) is s
    assert check_resume(s, s.id, s.resume_token, 0, "alice", NOW, WINDOW, False) is s


def test_the_window_is_measured_from_the_detach_on_the_clock_given() -> None:
    s = _session(detached_at=NOW - WINDOW)
    check_resume(s, s.id, s.resume_token, 0, "alice", NOW, WINDOW, False)  # exactly at the edge: kept
    assert not window_passed(s, NOW, WINDOW)
    assert window_passed(s, NOW + 0.001, WINDOW)
    with pytest.raises(ResumeWindowExpired, match="window"):
        check_resume(s, s.id, s.resume_token, 0, "alice", NOW + 0.001, WINDOW, False)


@pytest.mark.parametrize("state", ["missing", "attached", "expired"])
def test_nothing_to_resume(state: str) -> None:
    s = _session(detached_at=None if state == "attached" else NOW - 1)
    s.expired = state == "expired"
    with pytest.raises(ResumeWindowExpired):
        check_resume(None if state == "missing" else s, "sess_x", s.resume_token, 0, "alice", NOW, WINDOW, False)


def test_wrong_token_or_principal() -> None:
    s = _session()
    with pytest.raises(Unauthenticated):
        check_resume(s, s.id, "rtk_wrong", 0, "alice", NOW, WINDOW, False)
    with pytest.raises(Unauthenticated):
        check_resume(s, s.id, s.resume_token, 0, "mallory", NOW, WINDOW, False)


def test_a_closed_session_resumes_only_while_its_jobs_run() -> None:
    s = _session()
    s.closed = True
    with pytest.raises(ResumeWindowExpired, match="closed"):
        check_resume(s, s.id, s.resume_token, 0, "alice", NOW, WINDOW, False)
    assert check_resume(s, s.id, s.resume_token, 0, "alice", NOW, WINDOW, True) is s


def test_a_seq_beyond_the_last_sent() -> None:
    s = _session(seq=7)
    with pytest.raises(InvalidRequest, match="beyond"):
        check_resume(s, s.id, s.resume_token, 8, "alice", NOW, WINDOW, False)


def test_the_log_must_still_hold_what_follows_the_last_seq() -> None:
    check_log_kept("s", 7, 7, None)  # nothing to replay
    check_log_kept("s", 3, 7, 4)  # 4..7 kept
    check_log_kept("s", 3, 7, 1)
    with pytest.raises(ResumeWindowExpired, match="no longer kept"):
        check_log_kept("s", 3, 7, 5)  # 4 was trimmed
    with pytest.raises(ResumeWindowExpired):
        check_log_kept("s", 3, 7, None)  # everything was trimmed
