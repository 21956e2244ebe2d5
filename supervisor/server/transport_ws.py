"""The WebSocket transport: a thin shell over `websockets` (protocol.md §1.1).

The same listener answers three plain HTTP GETs, without a token (bind to loopback, or put
them behind the operator's proxy): `/metrics` (Prometheus text, or OpenMetrics when the
scraper asks for it; supervisor/metrics.py), `/healthz` (200 while the process serves) and
`/readyz` (200 when the fork server is up and the server is not draining, else 503).
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
from http import HTTPStatus

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from supervisor import metrics
from supervisor.server.connection import serve_connection
from supervisor.runtime import WS_FRAME_CAP, Runtime

log = logging.getLogger("arcp.ws")
MAX_INBOUND = 4 * 1024 * 1024
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
HTTP_PATHS = ("/metrics", "/healthz", "/readyz")


class WSTransport:
    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws

    async def recv(self) -> str | bytes | None:
        try:
            return await self.ws.recv()
        except ConnectionClosed:
            return None

    def _can_write_now(self) -> bool:
        """Open, its transport not paused by flow control, and no close to be handled."""
        ws = self.ws
        return ws.protocol.state is State.OPEN and not ws.paused and not ws.transport.is_closing() \
            and not ws.protocol.close_expected()

    def _write_now(self, frames: list[bytes]) -> None:
        """Frame a batch and write it (after `_can_write_now`); the next `send_many` waits for
        the socket to drain if this filled the transport's buffer."""
        protocol = self.ws.protocol
        for data in frames:
            protocol.send_text(data)
        self.ws.transport.write(b"".join(protocol.data_to_send()))

    async def send_many(self, frames: list[bytes]) -> None:
        """Frame a batch in the websockets protocol, then write it with one syscall.

        On an open connection whose transport is not paused (the usual case) the batch is
        written at once, and the writer waits only if that write filled the transport's buffer
        (the flow control `send_context` applies on its exit). Otherwise, or when the batch
        leaves a close to be handled, it goes through `send_context`, which checks the
        connection is open and, on exit, waits for the socket to drain. One write per batch
        instead of one per frame halves the supervisor's CPU per event.
        """
        ws = self.ws
        if self._can_write_now():
            self._write_now(frames)
            if ws.paused:
                try:
                    await ws.drain()
                except OSError:  # the connection was lost meanwhile: its reader sees it end
                    pass
            return
        protocol = ws.protocol
        try:
            async with ws.send_context():
                for data in frames:
                    protocol.send_text(data)
                chunks = protocol.data_to_send()
                if b"" in chunks:  # an end of stream is queued: let websockets handle it
                    for chunk in chunks:
                        if chunk:
                            ws.transport.write(chunk)
                        elif ws.transport.can_write_eof():
                            ws.transport.write_eof()
                else:
                    ws.transport.write(b"".join(chunks))
        except ConnectionClosed:
            pass

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code, reason)


def http_endpoint(conn: ServerConnection, rt: Runtime, path: str, accept: str | None) -> Response:
    """The answer to a plain GET of one of HTTP_PATHS."""
    if path == "/healthz":
        return conn.respond(HTTPStatus.OK, "ok\n")
    if path == "/readyz":
        why = metrics.readiness(rt)
        return conn.respond(HTTPStatus.OK, "ready\n") if why is None else \
            conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {why}\n")
    if not metrics.enabled():
        return conn.respond(HTTPStatus.NOT_FOUND, "metrics are off on this server (--no-metrics)\n")
    body, content_type = metrics.render(accept)
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Content-Length", str(len(body))), ("Content-Type", content_type)])
    return Response(HTTPStatus.OK.value, HTTPStatus.OK.phrase, headers, body)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def start_ws(rt: Runtime) -> Server:
    cfg = rt.config
    allowed_hosts = set(LOOPBACK_NAMES) | {cfg.host.strip("[]")}
    open_hosts = cfg.host in ("0.0.0.0", "::", "")

    def process_request(conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path != cfg.path and path not in HTTP_PATHS:
            return conn.respond(HTTPStatus.NOT_FOUND, f"no ARCP endpoint at {path}; try {cfg.path}\n")
        host = request.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]", 1)[0]
        if not open_hosts and name not in allowed_hosts:
            return conn.respond(HTTPStatus.MISDIRECTED_REQUEST, f"host {name!r} is not served here\n")
        if path != cfg.path:
            return http_endpoint(conn, rt, path, request.headers.get("Accept"))
        return None

    async def handler(ws: ServerConnection) -> None:
        peer = ws.remote_address  # (host, port, ...) of the client: for the log
        await serve_connection(rt, WSTransport(ws), WS_FRAME_CAP,
                               peer=f"{_url_host(str(peer[0]))}:{peer[1]}" if peer else "unknown")

    return await serve(
        handler, cfg.host, cfg.port, process_request=process_request,
        compression="deflate" if cfg.ws_compression else None,
        max_size=MAX_INBOUND, max_queue=64, ping_interval=None,
    )
