"""The checks of a resume request (protocol.md §5.1), on the session table's state; no I/O."""

from __future__ import annotations

import hmac

from shared.envelope import Envelope
from shared.errors import InvalidRequest, ResumeWindowExpired, Unauthenticated
from supervisor.core.session import Session


def resume_request(hello: Envelope) -> tuple[str, str, int]:
    """The session id, token and last seq a hello's `resume` names; errors name the field."""
    r = hello.payload.get("resume")
    if not isinstance(r, dict) or not isinstance(r.get("session_id"), str):
        raise InvalidRequest("session.hello 'resume' needs a 'session_id' string")
    sid, token, last = r["session_id"], r.get("resume_token"), r.get("last_event_seq", 0)
    if not isinstance(token, str):
        raise Unauthenticated("resume needs a 'resume_token' string")
    if last is None:
        last = 0
    if isinstance(last, bool) or not isinstance(last, int) or last < 0:
        raise InvalidRequest("resume 'last_event_seq' must be an integer >= 0")
    return sid, token, last


def check_resume(s: Session | None, sid: str, token: str, last: int, principal: str, now: float,
                 window: float, has_running_jobs: bool) -> Session:
    """The detached session a resume may take over; ResumeWindowExpired (the caller then
    forgets a session whose window has passed), Unauthenticated or InvalidRequest otherwise."""
    if s is None or s.expired or s.detached_at is None:
        raise ResumeWindowExpired(f"no resumable session {sid!r}")
    if now - s.detached_at > window:
        raise ResumeWindowExpired(f"the resume window of session {sid!r} has passed")
    if not hmac.compare_digest(token.encode(), s.resume_token.encode()) or principal != s.principal:
        raise Unauthenticated("resume token or principal does not match the session")
    if s.closed and not has_running_jobs:
        raise ResumeWindowExpired(f"session {sid!r} was closed and has no running jobs")
    if last > s.seq:
        raise InvalidRequest(f"resume 'last_event_seq' {last} is beyond the session's last seq {s.seq}")
    return s


def check_log_kept(sid: str, last: int, newest: int, oldest: int | None) -> None:
    """The frames after `last` are still in the session's log (its oldest kept is `oldest`)."""
    if last < newest and (oldest is None or oldest > last + 1):
        raise ResumeWindowExpired(f"events after seq {last} of session {sid!r} are no longer kept")


def window_passed(s: Session, now: float, window: float) -> bool:
    return s.detached_at is not None and now - s.detached_at > window


