"""One client connection, whatever the transport: handshake, then read and write loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

import orjson

from shared.envelope import request_id_of
from shared.errors import ARCPError, InvalidRequest
from supervisor.frames import session_error
from supervisor.runtime import Runtime
from supervisor.session import Session, authenticate, check_hello, detect_flavour, negotiate

log = logging.getLogger("arcp.connection")
HANDSHAKE_TIMEOUT = 30.0
CLOSE_DRAIN = 2.0


class Transport(Protocol):
    async def recv(self) -> str | bytes | None: ...  # None: the peer is gone
    async def send_many(self, frames: list[bytes]) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


async def serve_connection(rt: Runtime, transport: Transport, frame_cap: int) -> None:
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
        await _refuse(transport, InvalidRequest(f"frame is not valid JSON: {e}"), None)
        return
    try:
        hello = check_hello(obj)
        principal = authenticate(rt.config.tokens, hello)
    except ARCPError as e:
        await _refuse(transport, e, request_id_of(obj))
        return

    closing = asyncio.Event()
    close_as: tuple[int, str] = (1000, "bye")

    def close(code: int, reason: str) -> None:
        nonlocal close_as
        close_as = (code, reason)
        closing.set()

    session = Session(rt, principal, detect_flavour(hello), negotiate(hello), frame_cap, close)
    session.send(session.welcome(hello.payload.get("capabilities")))
    log.info("session %s opened for %s (%s flavour)", session.id, principal, session.flavour)
    writer = asyncio.create_task(_write_loop(session, transport))
    try:
        while not closing.is_set():
            recv = asyncio.ensure_future(transport.recv())
            stop = asyncio.ensure_future(closing.wait())
            done, _ = await asyncio.wait({recv, stop}, return_when=asyncio.FIRST_COMPLETED)
            if recv not in done:
                recv.cancel()
                with contextlib.suppress(BaseException):
                    await recv
                break
            stop.cancel()
            data = recv.result()
            if data is None:
                break
            session.receive(data)
        if closing.is_set():
            await _drain(session)
    finally:
        writer.cancel()
        with contextlib.suppress(BaseException):
            await writer
        session.outbox.detach()
        rt.session_closed(session)
        await transport.close(*close_as)
        log.info("session %s closed", session.id)


async def _drain(session: Session) -> None:
    """Give the writer a bounded moment to send what is queued (e.g. session.closed)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_DRAIN):
            while len(session.outbox):
                await asyncio.sleep(0.005)


async def _write_loop(session: Session, transport: Transport) -> None:
    outbox = session.outbox
    while outbox.attached:
        batch = await outbox.get_batch()
        if batch:
            await transport.send_many(batch)


async def _refuse(transport: Transport, err: ARCPError, request_id: str | None) -> None:
    data = orjson.dumps(session_error(err, session_id=None, request_id=request_id))
    with contextlib.suppress(Exception):
        await transport.send_many([data])
    await transport.close(1008 if err.code == "UNAUTHENTICATED" else 1002, err.code.lower())
