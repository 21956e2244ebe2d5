"""The session table: open, resume, detach, and forget sessions past their window."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from shared.envelope import Envelope, frame
from shared.errors import ResumeWindowExpired
from shared.ids import new_resume_token, new_ulid
from supervisor.config import Config
from supervisor.core.jobs import JobTable
from supervisor.core.resume import check_log_kept, check_resume, resume_request, window_passed
from supervisor.core.session import CloseTransport, Session, SessionSettings, detect_flavour, negotiate
from supervisor.jobs.delivery import Delivery
from supervisor.state.base import StateStore

log = logging.getLogger("arcp.runtime")


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

    def open(self, hello: Envelope, principal: str, frame_cap: int, close: CloseTransport) -> Session:
        cfg = self._config()
        settings = SessionSettings(resume_window=cfg.resume_window, heartbeat_interval=cfg.heartbeat_interval,
                                   back_pressure_threshold=cfg.back_pressure_threshold,
                                   log_bytes=cfg.session_log_bytes, frame_cap=frame_cap,
                                   admin=principal in cfg.admins)
        s = Session(settings, principal, detect_flavour(hello), negotiate(hello, self.features),
                    self.store.log_frame, close, time.monotonic())
        self.sessions[s.id] = s
        s.send(s.welcome(self._inventory()))
        return s

    async def resume(self, hello: Envelope, principal: str, close: CloseTransport) -> tuple[Session, int]:
        """Take over a detached session (protocol.md §5.1): its welcome, then every frame
        kept after the client's last seq, unchanged; the session and how many were replayed."""
        sid, token, last = resume_request(hello)
        s = self.sessions.get(sid)
        now = time.monotonic()
        window = self._config().resume_window
        if s is not None and not s.expired and window_passed(s, now, window):
            self.expire(s)
        running = s is not None and any(j.owner is s and not j.done for j in self.jobs.jobs.values())
        s = check_resume(s, sid, token, last, principal, now, window, running)
        check_log_kept(sid, last, s.seq, await self.store.oldest_seq(s.id))
        if s.detached_at is None or s.expired:  # taken or forgotten while the store answered
            raise ResumeWindowExpired(f"no resumable session {sid!r}")
        s.resume_token = new_resume_token()
        s.closed = False
        s.features = negotiate(hello, self.features)
        s.attach(close, now)
        s.send(s.welcome(self._inventory()))
        # From the attach on, new frames are queued after the welcome; the read is queued in the
        # store now, before any of them is logged: it holds every frame kept until the attach.
        rows = await self.store.frames_since(s.id, last)
        s.outbox.insert(1, [data for _, data in rows])
        return s, len(rows)

    def detached(self, s: Session) -> None:
        s.detach(time.monotonic())

    def expire(self, s: Session) -> None:
        s.expired = True
        s.outbox.detach()
        self.sessions.pop(s.id, None)
        self.delivery.forget_session(s)
        self.store.forget_session(s.id)

    def sweep(self, now: float) -> None:
        """Forget sessions past their resume window."""
        window = self._config().resume_window
        for s in list(self.sessions.values()):
            if window_passed(s, now, window):
                self.expire(s)

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
