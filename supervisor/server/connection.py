"""One client connection, whatever the transport: the handshake (a new or a resumed
session), then a task group of three: the reader (this task), the writer and the
heartbeat ticker. The session itself is pure (supervisor/core/session.py): this module
feeds it frames and the time, carries its requests to the runtime, and writes what it
queues."""

from __future__ import annotations

import logging
import time
from typing import Protocol

import anyio
import orjson

from shared.envelope import request_id_of
from shared.errors import ARCPError, InternalError, InvalidRequest
from supervisor.core.frames import session_error
from supervisor.core.session import Session, authenticate, check_hello
from supervisor.server.host import ConnectionHost

log = logging.getLogger("arcp.connection")
HANDSHAKE_TIMEOUT = 30.0
CLOSE_DRAIN = 2.0
SHUTDOWN_DRAIN = 10.0  # for the last frames (terminals, session.bye) when the server or a stdio session ends
CLOSE_TIMEOUT = 5.0  # for the transport's closing handshake


class Transport(Protocol):
    async def recv(self) -> str | bytes | None: ...  # None: the peer is gone
    async def send_many(self, frames: list[bytes]) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


class _Closer:
    """How the session asks for its transport to close: the first reason stands (a
    shutdown's 1001, not the bye a client answers it with); the reader stops."""

    def __init__(self) -> None:
        self.closing = False
        self.code_reason: tuple[int, str] = (1000, "bye")
        self.reader = anyio.CancelScope()

    def __call__(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.code_reason = (code, reason)
        self.closing = True
        self.reader.cancel()


async def serve_connection(rt: ConnectionHost, transport: Transport, frame_cap: int, *, linger: bool = False,
                           peer: str = "stdio") -> None:
    """Serve one client until its transport ends. With `linger` (stdio, where the process
    ends with its one session), the end of the client's input (or its bye) does not end
    the session's jobs: they run to their terminals, which are written before the close.
    `peer` (the client's address) is for the log."""
    log.debug("connection open", extra={"remote": peer})
    first: str | bytes | None = None
    with anyio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
        first = await transport.recv()
    if handshake.cancelled_caught:
        await transport.close(1008, "no session.hello")
        return
    if first is None:
        return
    closer = _Closer()
    session = await _handshake(rt, transport, first, frame_cap, closer, peer)
    if session is None:
        return
    sending = [False]  # the writer is in the middle of a batch
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_write_loop, session, transport, sending)
            heart = anyio.CancelScope()
            tg.start_soon(_heartbeat, rt, session, heart)
            with closer.reader:
                while True:
                    data = await transport.recv()
                    if data is None:
                        break
                    try:
                        request = session.receive(data, time.monotonic())
                    except Exception as e:  # a fault of ours: answered, and the session goes on
                        log.error("session %s: a frame could not be handled: %r", session.id, e, exc_info=e)
                        session.error(InternalError(f"the frame could not be handled: {type(e).__name__}"))
                        continue
                    if request is not None:
                        # A close (bye, shutdown, a stalled client) stops the reader, not a
                        # request half carried out: a submit is accepted whole or not at all.
                        with anyio.CancelScope(shield=True):
                            try:
                                await rt.handle(session, request)
                            except Exception as e:  # answered; the connection goes on
                                session.failed(request, e)
            if linger:
                heart.cancel()  # no more input is coming: not a lost heartbeat
                if rt.unfinished_jobs(session.id):
                    log.info("session %s: input ended; waiting for its jobs to end", session.id)
                    await rt.wait_jobs(None, owner_id=session.id)
                await _drain(session, sending, SHUTDOWN_DRAIN)
            elif closer.closing:
                await _drain(session, sending, SHUTDOWN_DRAIN if rt.draining else CLOSE_DRAIN)
            tg.cancel_scope.cancel()
    finally:
        rt.session_detached(session)
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            await transport.close(*closer.code_reason)
        log.debug("session %s transport closed (%s)", session.id, closer.code_reason[1],
                  extra={"remote": peer, "session_id": session.id, "reason": closer.code_reason[1]})


async def _handshake(rt: ConnectionHost, transport: Transport, first: str | bytes, frame_cap: int,
                     closer: _Closer, peer: str) -> Session | None:
    """The session the first frame opens or resumes, its welcome queued; None when it was
    refused (and the refusal sent)."""
    try:
        obj = orjson.loads(first)
    except orjson.JSONDecodeError as e:
        await _refuse(transport, InvalidRequest(f"frame is not valid JSON: {e}"), None, None)
        return None
    resume_sid = None
    principal: str | None = None
    try:
        hello = check_hello(obj)
        r = hello.payload.get("resume")
        resume_sid = r.get("session_id") if isinstance(r, dict) and isinstance(r.get("session_id"), str) else None
        principal = authenticate(rt.config.tokens, hello)
        if rt.draining and (resume_sid is None or not rt.unfinished_jobs(resume_sid)):
            # A resume is still taken while its session has jobs running: their terminals go to it.
            raise InternalError("the server is shutting down and takes no new sessions", retryable=True,
                                details={"reason": "draining"})
        if hello.payload.get("resume") is None:
            session = rt.open_session(hello, principal, frame_cap, closer)
            log.debug("session %s opened for %s (%s flavour)", session.id, principal, session.flavour,
                      extra={"remote": peer, "session_id": session.id, "principal": principal})
        else:
            session, replayed = await rt.resume_session(hello, principal, frame_cap, closer)
            log.debug("session %s resumed; %d frames replayed", session.id, replayed,
                      extra={"remote": peer, "session_id": session.id, "principal": principal})
        return session
    except ARCPError as e:
        if e.code == "UNAUTHENTICATED":  # never the token: who (if known), from where, why
            log.warning("authentication failed: %s", e.message, extra={
                "remote": peer, "principal": principal, "session_id": resume_sid, "reason": e.message})
        await _refuse(transport, e, request_id_of(obj), resume_sid)
        log.debug("connection closed", extra={"remote": peer, "reason": e.code.lower()})
        return None


async def _heartbeat(rt: ConnectionHost, session: Session, scope: anyio.CancelScope) -> None:
    """Tick the session: it pings an idle client and ends a silent or non-reading one."""
    tick = min(rt.config.heartbeat_interval / 2, 5.0)
    with scope:
        while True:
            await anyio.sleep(tick)
            session.tick(time.monotonic())


async def _drain(session: Session, sending: list[bool], limit: float) -> None:
    """Give the writer a bounded moment to send what is queued (e.g. session.closed),
    including the batch it is writing."""
    with anyio.move_on_after(limit):
        while len(session.outbox) or sending[0]:
            await anyio.sleep(0.005)


async def _write_loop(session: Session, transport: Transport, sending: list[bool]) -> None:
    outbox = session.outbox
    while outbox.attached:
        batch = await outbox.get_batch()
        if batch:
            sending[0] = True
            try:
                await transport.send_many(batch)
            finally:
                sending[0] = False


async def _refuse(transport: Transport, err: ARCPError, request_id: str | None, session_id: str | None) -> None:
    data = orjson.dumps(session_error(err, session_id=session_id, request_id=request_id))
    try:
        await transport.send_many([data])
    except Exception as e:  # the peer may be gone already: the close below is what matters
        log.debug("refusal not sent: %r", e)
    if err.code == "UNAUTHENTICATED":
        await transport.close(1008, "unauthenticated")
    elif (err.details or {}).get("reason") == "draining":
        await transport.close(1001, "shutdown")
    else:
        await transport.close(1002, err.code.lower())
