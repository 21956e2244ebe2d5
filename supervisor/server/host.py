"""What a connection needs of the runtime (supervisor/runtime.py provides it)."""

from __future__ import annotations

from typing import Protocol

from shared.envelope import Envelope
from supervisor.config import Config
from supervisor.core.jobs import Job
from supervisor.core.requests import Request
from supervisor.core.session import CloseTransport, Session


class ConnectionHost(Protocol):
    @property
    def config(self) -> Config: ...

    @property
    def draining(self) -> bool: ...

    def open_session(self, hello: Envelope, principal: str, frame_cap: int, close: CloseTransport) -> Session: ...

    async def resume_session(self, hello: Envelope, principal: str, frame_cap: int,
                             close: CloseTransport) -> tuple[Session, int]: ...

    async def handle(self, session: Session, request: Request) -> None: ...

    def session_detached(self, session: Session) -> None: ...

    def unfinished_jobs(self, owner_id: str | None = None) -> list[Job]: ...

    async def wait_jobs(self, timeout: float | None, *, owner_id: str | None = None) -> bool: ...
