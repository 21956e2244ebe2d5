"""One client connection, whatever the transport: handshake (new or resumed session),
then the read loop, the write loop and the heartbeat."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Protocol

import orjson

from shared.envelope import frame, request_id_of
from shared.errors import ARCPError, HeartbeatLost, InternalError, InvalidRequest
from shared.ids import new_id, new_ulid, now_ts
from supervisor.core.frames import session_error
from supervisor.runtime import Runtime
from supervisor.core.session import Session, authenticate, check_hello, detect_flavour, negotiate

log = logging.getLogger("arcp.connection")
HANDSHAKE_TIMEOUT = 30.0
CLOSE_DRAIN = 2.0
SHUTDOWN_DRAIN = 10.0  # for the last frames (terminals, session.bye) when the server or a stdio session ends
STALL_LIMIT = 60.0  # seconds a client may leave its queue at the high-water mark


class Transport(Protocol):
    async def recv(self) -> str | bytes | None: ...  # None: the peer is gone
    async def send_many(self, frames: list[bytes]) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


async def serve_connection(rt: Runtime, transport: Transport, frame_cap: int, *, linger: bool = False,
                           peer: str = "stdio") -> None:
    """Serve one client until its transport ends. With `linger` (stdio, where the process
    ends with its one session), the end of the client's input (or its bye) does not end
    the session's jobs: they run to their terminals, which are written before the close.
    `peer` (the client's address) is for the log."""
    log.debug("connection open", extra={"remote": peer})
    try:
        first = await asyncio.wait_for(transport.recv(), HANDSHAKE_TIMEOUT)
    except TimeoutError:
        await transport.close(1008, "no session.hello")
        return
    if first is None:
        return
    try:
        obj = orjson.loads(first)
    except orjson.JSONDecodeError as e:
        await _refuse(transport, InvalidRequest(f"frame is not valid JSON: {e}"), None, None)
        return
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
        resumed = rt.resume(hello, principal) if hello.payload.get("resume") is not None else None
    except ARCPError as e:
        if e.code == "UNAUTHENTICATED":  # never the token: who (if known), from where, why
            log.warning("authentication failed: %s", e.message, extra={
                "remote": peer, "principal": principal, "session_id": resume_sid, "reason": e.message})
        await _refuse(transport, e, request_id_of(obj), resume_sid)
        log.debug("connection closed", extra={"remote": peer, "reason": e.code.lower()})
        return

    closing = False
    close_as: tuple[int, str] = (1000, "bye")
    reader: asyncio.Task[None] | None = None

    def close(code: int, reason: str) -> None:
        nonlocal close_as, closing
        if closing:  # the first reason stands (a shutdown's 1001, not the bye a client answers it with)
            return
        close_as = (code, reason)
        closing = True
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()

    if resumed is None:
        session = Session(rt, principal, detect_flavour(hello), negotiate(hello, rt.features), frame_cap, close)
        rt.open_session(session)
        session.send(session.welcome())
        log.debug("session %s opened for %s (%s flavour)", session.id, principal, session.flavour,
                  extra={"remote": peer, "session_id": session.id, "principal": principal})
    else:
        session, last = resumed
        session.features = negotiate(hello, rt.features)
        session.attach(close)
        session.send(session.welcome())
        n = rt.replay(session, last)
        log.debug("session %s resumed after seq %d; %d frames replayed", session.id, last, n,
                  extra={"remote": peer, "session_id": session.id, "principal": principal})

    sending = [False]  # the writer is in the middle of a batch
    writer = asyncio.create_task(_write_loop(session, transport, sending))
    heart = asyncio.create_task(_heartbeat(rt, session))
    last_in = [time.monotonic()]
    session.last_inbound = last_in

    async def read_loop() -> None:
        while not closing:
            data = await transport.recv()
            if data is None:
                return
            last_in[0] = time.monotonic()
            session.receive(data)

    reader = asyncio.create_task(read_loop())
    try:
        try:
            await reader
        except asyncio.CancelledError:
            if not closing:  # our own task is being cancelled (shutdown): let it through
                raise
        if linger:
            heart.cancel()  # no more input is coming: not a lost heartbeat
            if rt.unfinished_jobs(session.id):
                log.info("session %s: input ended; waiting for its jobs to end", session.id)
                await rt.wait_jobs(None, owner_id=session.id)
            await _drain(session, sending, SHUTDOWN_DRAIN)
        elif closing:
            await _drain(session, sending, SHUTDOWN_DRAIN if rt.draining else CLOSE_DRAIN)
    finally:
        heart.cancel()
        writer.cancel()
        for t in (heart, writer):
            with contextlib.suppress(BaseException):
                await t
        rt.session_detached(session)
        await transport.close(*close_as)
        log.debug("session %s transport closed (%s)", session.id, close_as[1],
                  extra={"remote": peer, "session_id": session.id, "reason": close_as[1]})


async def _heartbeat(rt: Runtime, session: Session) -> None:
    """Ping after an idle interval; end a silent session with HEARTBEAT_LOST after two."""
    interval = rt.config.heartbeat_interval
    enabled = "heartbeat" in session.features
    tick = min(interval / 2, 5.0)
    while True:
        await asyncio.sleep(tick)
        now = time.monotonic()
        if session.outbox.stalled_for(now) > STALL_LIMIT:
            session.error(InternalError("consumer too slow: the client stopped reading"))
            session.close_transport(1011, "consumer too slow")
            return
        if not enabled:
            continue
        idle = now - session.last_inbound[0]
        if idle >= 2 * interval:
            session.error(HeartbeatLost(f"no traffic from the client for {idle:.0f} s", retryable=True))
            session.close_transport(1001, "heartbeat lost")
            return
        if idle >= interval and now - session.last_ping >= interval:
            session.last_ping = now
            session.send(frame("session.ping", new_ulid(), {"nonce": new_id("p"), "sent_at": now_ts()},
                               session_id=session.id))


async def _drain(session: Session, sending: list[bool], limit: float) -> None:
    """Give the writer a bounded moment to send what is queued (e.g. session.closed),
    including the batch it is writing."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(limit):
            while len(session.outbox) or sending[0]:
                await asyncio.sleep(0.005)


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
    with contextlib.suppress(Exception):
        await transport.send_many([data])
    if err.code == "UNAUTHENTICATED":
        await transport.close(1008, "unauthenticated")
    elif (err.details or {}).get("reason") == "draining":
        await transport.close(1001, "shutdown")
    else:
        await transport.close(1002, err.code.lower())
