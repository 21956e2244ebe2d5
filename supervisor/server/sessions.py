"""The session table: open, resume, detach, and forget sessions past their window."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from shared.envelope import Envelope, frame
from shared.errors import InternalError, ResumeWindowExpired
from shared.ids import new_resume_token, new_ulid
from supervisor.config import Config
from supervisor.core.jobs import JobTable
from supervisor.core.resume import check_log_kept, check_resume, resume_request, window_passed
from supervisor.core.session import CloseTransport, Session, SessionSettings, detect_flavour, negotiate
from supervisor.jobs.delivery import Delivery
from supervisor.state.base import StateStore, StoreError

log = logging.getLogger("arcp.runtime")


class SessionDirectory(Protocol):
    """Where sessions are known beyond this process (supervisor/cluster/: several processes on
    one database); without one, a session exists only in the process that opened it."""

    def opened(self, s: Session) -> None:
        """Opened or resumed here, with a transport."""

    def detached(self, s: Session) -> None: ...

    def expired(self, s: Session) -> None: ...

    async def take(self, sid: str, token: str, last: int, principal: str) -> tuple[int, str]:
        """A session another process numbered, for a resume here: its seq and flavour."""

    def adopted(self, s: Session) -> None:
        """A session taken over here is attached."""


class SessionTable:
    def __init__(self, config: Callable[[], Config], store: StateStore, jobs: JobTable, delivery: Delivery,
                 features: tuple[str, ...], inventory: Callable[[], list[dict[str, Any]]]) -> None:
        self._config = config  # the current configuration: a reload replaces it
        self.store = store
        self.jobs = jobs
        self.delivery = delivery
        self.features = features
        self._inventory = inventory
        self.sessions: dict[str, Session] = {}
        self.directory: SessionDirectory | None = None
        self._unlogged: set[str] = set()  # sessions told that their log misses frames

    def _settings(self, principal: str, frame_cap: int) -> SessionSettings:
        cfg = self._config()
        return SessionSettings(resume_window=cfg.resume_window, heartbeat_interval=cfg.heartbeat_interval,
                               back_pressure_threshold=cfg.back_pressure_threshold,
                               log_bytes=cfg.session_log_bytes, frame_cap=frame_cap, admin=principal in cfg.admins)

    def open(self, hello: Envelope, principal: str, frame_cap: int, close: CloseTransport) -> Session:
        s = Session(self._settings(principal, frame_cap), principal, detect_flavour(hello),
                    negotiate(hello, self.features), self._keep, close, time.monotonic())
        self.sessions[s.id] = s
        if self.directory is not None:
            self.directory.opened(s)
        s.send(s.welcome(self._inventory()))
        return s

    async def _take(self, hello: Envelope, principal: str, frame_cap: int, sid: str, token: str,
                    last: int) -> Session | None:
        """A session another process numbered, taken over (detached, not yet in the table), or
        None without a directory."""
        if self.directory is None:
            return None
        seq, _flavour = await self.directory.take(sid, token, last, principal)
        s = Session(self._settings(principal, frame_cap), principal, detect_flavour(hello),
                    negotiate(hello, self.features), self._keep, _unattached, time.monotonic(),
                    session_id=sid, seq=seq)
        s.resume_token = token  # (replaced below, as for any resume)
        s.detach(time.monotonic())
        return s

    async def resume(self, hello: Envelope, principal: str, close: CloseTransport,
                     frame_cap: int) -> tuple[Session, int]:
        """Take over a detached session (protocol.md §5.1): its welcome, then every frame
        kept after the client's last seq, unchanged; the session and how many were replayed.
        A session this process does not have is asked of the directory (another process may
        number it)."""
        sid, token, last = resume_request(hello)
        s = self.sessions.get(sid)
        taken = None
        if s is None:
            taken = s = await self._take(hello, principal, frame_cap, sid, token, last)
            if sid in self.sessions:  # resumed here meanwhile, by another connection
                raise ResumeWindowExpired(f"session {sid!r} is live on another transport")
        now = time.monotonic()
        window = self._config().resume_window
        if s is not None and not s.expired and window_passed(s, now, window):
            self.expire(s)
        running = s is not None and any(j.owner is s and not j.done for j in self.jobs.jobs.values())
        s = check_resume(s, sid, token, last, principal, now, window, running)
        check_log_kept(sid, last, s.seq, await self.store.oldest_seq(s.id))
        if s.detached_at is None or s.expired:  # taken or forgotten while the store answered
            raise ResumeWindowExpired(f"no resumable session {sid!r}")
        if taken is not None:
            self.sessions[sid] = s
        s.resume_token = new_resume_token()
        s.closed = False
        s.features = negotiate(hello, self.features)
        s.attach(close, now)
        if self.directory is not None:
            self.directory.opened(s)
        s.send(s.welcome(self._inventory()))
        # From the attach on, new frames are queued after the welcome; the read is queued in the
        # store now, before any of them is logged: it holds every frame kept until the attach.
        rows = await self.store.frames_since(s.id, last)
        s.outbox.insert(1, [data for _, data in rows])
        if taken is not None and self.directory is not None:
            self.directory.adopted(s)  # what was relayed to it meanwhile follows the replay
        return s, len(rows)

    def _keep(self, session_id: str, seq: int, job_id: str, data: bytes) -> None:
        """Log a session's frame for resume. A store that refuses it (its queue is full: the
        database has been away too long) does not stop the frame: it is sent, and the session's
        client is told, once until the store takes its frames again, that a resume may miss it."""
        try:
            self.store.log_frame(session_id, seq, job_id, data)
        except StoreError as e:
            if session_id in self._unlogged:
                return
            self._unlogged.add(session_id)
            log.error("session %s: frame %d is not kept for resume: %s", session_id, seq, e)
            s = self.sessions.get(session_id)
            if s is not None:
                s.error(InternalError(f"event_seq {seq} and later may be missing from this session's resume "
                                      f"log: the state store cannot keep them now", retryable=True,
                                      details={"reason": "state store full", "event_seq": seq}))
            return
        if session_id in self._unlogged:
            self._unlogged.discard(session_id)
            log.warning("session %s: frames are kept for resume again from %d", session_id, seq)

    def detached(self, s: Session) -> None:
        s.detach(time.monotonic())
        if self.directory is not None and self.sessions.get(s.id) is s:
            self.directory.detached(s)

    def expire(self, s: Session) -> None:
        s.expired = True
        s.outbox.detach()
        self.sessions.pop(s.id, None)
        self.delivery.forget_session(s)
        self.store.forget_session(s.id)
        self._unlogged.discard(s.id)
        if self.directory is not None:
            self.directory.expired(s)

    def sweep(self, now: float) -> None:
        """Forget sessions past their resume window."""
        window = self._config().resume_window
        for s in list(self.sessions.values()):
            if window_passed(s, now, window):
                self.expire(s)

    def cut_all(self, reason: str) -> int:
        """Close every connected client's transport now (1012), with nothing more sent: what is
        queued is dropped (the sessions stay resumable from their logs); how many."""
        n = 0
        for s in list(self.sessions.values()):
            if s.detached_at is None and not s.expired:
                s.outbox.detach()
                s.close_transport(1012, reason)
                n += 1
        return n

    def close_all(self, reason: str = "server shutting down") -> int:
        """Tell each connected client the server is going (session.bye) and close its
        transport (1001) once what is queued for it has been written; how many."""
        n = 0
        for s in list(self.sessions.values()):
            if s.detached_at is None and not s.expired:
                s.send(frame("session.bye", new_ulid(), {"reason": reason}, session_id=s.id))
                s.close_transport(1001, "shutdown")
                n += 1
        return n


def _unattached(code: int, reason: str) -> None:
    """A session taken over from another process has no transport until it is attached."""
    return None
