"""One proxy connection from a job: one request (or one tunnel), then close.

An exchange is a task of its job's task group (`EgressJob.run`), started when
the listener hands the connection over. Every wait in it is bounded by a cancel
scope: the request head by the job's header timeout (answered 408, however the
head trickles in), name resolution and each connect by their own deadlines, an
error answer's lingering close by LINGER. A tunnel's two directions are two
tasks of a task group of the exchange's own. Past LOOP_COPY bytes a direction is
spliced by a relay thread (`relay`), which the exchange waits for.

When the job ends its task group is cancelled: the exchange's sockets are shut
down (its relays' splices end at once), and its clean-up, shielded and bounded
by RELAY_STOP, waits for its relay threads before it closes a descriptor and
gives its slot back (`caps`). An exception in one exchange ends that connection
only, never its job's other ones or the listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import anyio

from supervisor.core.authority import Authority
from supervisor.egress.caps import connection_caps
from supervisor.egress.messages import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    Destination,
    HeadError,
    IPAddress,
    RequestHead,
    RequestParser,
    ResponseParser,
    chunk,
    error_response,
    last_chunk,
    upstream_head,
)
from supervisor.egress.policy import (
    Refusal,
    check_host_header,
    check_lease,
    destination_of,
    usable_addresses,
)
from supervisor.egress.relay import Relay

log = logging.getLogger("arcp.egress")

CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
READ_CHUNK = 64 * 1024
LOOP_COPY = 256 * 1024  # bytes a stream is copied on the loop before a relay thread takes over
LINGER = 1.0  # seconds an error response waits for the job to stop sending
RELAY_STOP = 5.0  # seconds an ending exchange waits for its relay threads once their sockets are shut down


Emit = Callable[[str, dict[str, Any]], None]


class JobSide(Protocol):
    """What an exchange needs of its job's side of the proxy (`proxy.EgressJob`)."""

    requests: int  # requests let through to an origin

    @property
    def job_id(self) -> str: ...

    @property
    def authority(self) -> Authority: ...

    @property
    def emit(self) -> Emit: ...

    @property
    def header_timeout(self) -> float: ...

    @property
    def resolver(self) -> Callable[[str, int], Awaitable[Iterable[IPAddress]]]: ...

    @property
    def exchanges(self) -> set[Exchange]: ...  # an exchange leaves it when its slot is given back

    @property
    def closed(self) -> bool: ...

    def count_in(self, n: int) -> None: ...

    def count_out(self, n: int) -> None: ...

    def report_soon(self) -> None: ...

    def refuse(self, url: str, reason: str) -> None: ...


class IncompleteRead(Exception):
    """The peer closed the connection in the middle of a head or a body."""


class SocketReader:
    """Buffered reads from a non-blocking socket through the event loop (heads and request
    bodies); what is left in the buffer goes first when a relay takes over."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.buf = bytearray()

    async def _fill(self) -> None:
        data = await self.loop.sock_recv(self.sock, READ_CHUNK)
        if not data:
            raise IncompleteRead(bytes(self.buf))
        self.buf += data

    async def readuntil(self, sep: bytes, limit: int, status: int, message: str) -> bytes:
        """Up to and including `sep`; HeadError(status, message) past `limit` bytes."""
        start = 0
        while True:
            i = self.buf.find(sep, start)
            if i >= 0:
                end = i + len(sep)
                if end > limit:
                    raise HeadError(status, message)
                out = bytes(self.buf[:end])
                del self.buf[:end]
                return out
            if len(self.buf) > limit:
                raise HeadError(status, message)
            start = max(0, len(self.buf) - len(sep) + 1)
            await self._fill()

    async def read(self, n: int) -> bytes:
        if not self.buf:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


class Exchange:
    """One proxy connection from a job; `serve()` is its task."""

    def __init__(self, job: JobSide, client: socket.socket) -> None:
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.reader = SocketReader(self.loop, client)
        self.upstream: socket.socket | None = None
        self.relays: list[Relay] = []
        self.parser = RequestParser()
        self.caps = connection_caps()
        self.caps.open += 1
        self.counted = True  # in caps.open until its descriptors are closed

    def abort(self) -> None:
        """Cut the connection now (the job is ending): wakes its relays, whose splices end, and
        any read or write of its task; the task itself is cancelled by its job's task group."""
        for s in (self.client, self.upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def release(self) -> None:
        """Close its sockets and give its slot back, unless a relay thread may still use them.
        At the end of its task, or from its job for one whose task never ran."""
        self.job.exchanges.discard(self)
        if not self.counted:
            return
        if any(not r.finished.is_set() for r in self.relays):  # never close a descriptor a relay may use
            log.error("job %s: an egress relay did not stop; its sockets are left open", self.job.job_id)
            return
        self.counted = False
        self.caps.open -= 1
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    async def serve(self) -> None:
        job = self.job
        try:
            await self._exchange()
        except HeadError as e:  # a bad body or response after the checks: say so if we still can
            what = "bad request from the job: " if e.status < 500 else ""
            job.emit("log", {"level": "warn", "message": f"egress: {what}{e.message}"})
            await self._answer(error_response(e.status, f"arcp-supervisor egress proxy: {e.message}"))
        except (OSError, IncompleteRead):
            pass
        except Exception:  # a proxy fault ends this connection, never the others or the listener
            log.exception("job %s: egress connection failed", job.job_id)
        finally:  # cancelled or not: its relays stopped (bounded), then its descriptors closed
            with anyio.CancelScope(shield=True):
                await self._stop_relays()
            self.release()
            if not job.closed:
                job.report_soon()

    async def _stop_relays(self) -> None:
        running = [r for r in self.relays if not r.finished.is_set()]
        if not running:
            return
        self.abort()  # their sockets shut down: they end at once
        with anyio.move_on_after(RELAY_STOP):
            for r in running:
                await r.finished.wait()

    async def _exchange(self) -> None:
        job = self.job
        dest: Destination | None = None
        try:
            head = await self._head_in_time()
            dest = destination_of(head)
            check_host_header(head, dest)
            named = check_lease(job.authority, dest, time.time())
            addresses = [dest.ip] if dest.ip is not None else await self._resolve(dest)
            addresses = usable_addresses(dest, addresses, named)
        except HeadError as e:
            job.emit("log", {"level": "warn", "message": f"egress: bad request from the job: {e.message}"})
            await self._answer(error_response(e.status, f"arcp-supervisor egress proxy: {e.message}"))
            return
        except Refusal as r:
            shown = dest.url if dest is not None else "(request)"
            job.refuse(shown, r.reason)
            await self._answer(error_response(
                403, f"arcp-supervisor egress proxy: {shown} refused: {r.reason}", r.code))
            return
        job.requests += 1
        try:
            self.upstream = await self._connect(dest, addresses)
        except OSError as e:
            await self._answer(error_response(502, f"arcp-supervisor egress proxy: cannot connect to "
                                                   f"{dest.authority}: {e}"))
            return
        if dest.tunnel:
            await self._send(self.client, b"HTTP/1.1 200 Connection established\r\n"
                                          b"Proxy-Agent: arcp-supervisor\r\n\r\n", None)
            early = self.reader.take()  # what the job sent before it read our answer
            if early:
                await self._send(self.upstream, early, job.count_out)
            await self._tunnel(self.upstream)
        else:
            await self._forward(head, dest)

    async def _head_in_time(self) -> RequestHead:
        """The request head within the job's header timeout: one deadline for the whole head
        (a cancel scope), however slowly its bytes come."""
        timeout = self.job.header_timeout
        with anyio.move_on_after(timeout):
            return await self._read_head()
        raise HeadError(408, f"request head not received within {timeout:g} s")

    async def _read_head(self) -> RequestHead:
        """Read up to the empty line (bounded: 414, 431), then let h11 parse it."""
        r = self.reader
        line = await r.readuntil(b"\n", MAX_REQUEST_LINE, 414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        raw = bytearray(line)
        while True:
            line = await r.readuntil(b"\n", MAX_HEAD, 431, f"request head longer than {MAX_HEAD} bytes")
            raw += line
            if len(raw) > MAX_HEAD:
                raise HeadError(431, f"request head longer than {MAX_HEAD} bytes")
            if line in (b"\r\n", b"\n"):
                return self.parser.head(bytes(raw))

    async def _resolve(self, dest: Destination) -> list[IPAddress]:
        try:
            with anyio.fail_after(RESOLVE_TIMEOUT):
                addresses = list(await self.job.resolver(dest.host, dest.port))
        except (OSError, UnicodeError) as e:  # TimeoutError is an OSError
            why = str(e) or f"no answer within {RESOLVE_TIMEOUT:g} s"
            raise HeadError(502, f"cannot resolve {dest.host}: {why}") from None
        if not addresses:
            raise HeadError(502, f"cannot resolve {dest.host}: no address")
        return addresses

    async def _connect(self, dest: Destination, addresses: list[IPAddress]) -> socket.socket:
        last: OSError = OSError(f"no address for {dest.host}")
        for ip in addresses:  # the checked addresses, never a second lookup
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    await self.loop.sock_connect(s, (str(ip), dest.port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return s
            except TimeoutError:
                s.close()
                last = OSError(f"timed out after {CONNECT_TIMEOUT:g} s")
            except BaseException as e:
                s.close()
                if not isinstance(e, OSError):
                    raise
                last = e
        raise last

    async def _send(self, sock: socket.socket, data: bytes, count: Callable[[int], None] | None) -> None:
        await self.loop.sock_sendall(sock, data)
        if count is not None:
            count(len(data))

    async def _tunnel(self, up: socket.socket) -> None:
        """Both directions at once, two tasks of the tunnel's own task group, until both have
        reached end of stream; a failure of one (a reset) ends the other, then the exchange."""
        failed: list[OSError] = []

        async def direction(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
            try:
                await self._pump(src, dst, count, half_close=True)
            except OSError as e:
                failed.append(e)
                tunnel.cancel_scope.cancel()

        async with anyio.create_task_group() as tunnel:
            tunnel.start_soon(direction, self.client, up, self.job.count_out)
            tunnel.start_soon(direction, up, self.client, self.job.count_in)
        if failed:
            raise failed[0]

    async def _pump(self, src: socket.socket, dst: socket.socket, count: Callable[[int], None], *,
                    half_close: bool) -> None:
        """src -> dst until end of stream: on the loop for the first LOOP_COPY bytes (a small
        response costs no thread), then by a splicing relay thread for the rest."""
        moved = 0
        while moved < LOOP_COPY:
            data = await self.loop.sock_recv(src, READ_CHUNK)
            if not data:
                if half_close:
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                return
            await self._send(dst, data, count)
            moved += len(data)
        relay = Relay(self.loop, src, dst, count, half_close)
        self.relays.append(relay)
        relay.start()
        await relay.finished.wait()  # when cancelled, serve() stops it

    async def _forward(self, head: RequestHead, dest: Destination) -> None:
        job = self.job
        up = self.upstream
        assert up is not None
        await self._send(up, upstream_head(head, dest, self.parser.framing), job.count_out)
        if self.parser.framing[0] != "none":
            await self._copy_body()
        response = ResponseParser(head.method)
        while True:  # interim 1xx responses, then the final head
            got = response.next_head()
            if got is None:
                data = await self.loop.sock_recv(up, READ_CHUNK)
                if not data and not response.received:
                    await self._answer(error_response(502, "arcp-supervisor egress proxy: the origin closed "
                                                           "the connection without a response"))
                    return
                job.count_in(len(data))
                response.feed(data)
                continue
            rewritten, interim = got
            await self._send(self.client, rewritten, None)
            if not interim:
                break
        rest = response.rest()
        if rest:
            await self._send(self.client, rest, None)
        await self._pump(up, self.client, job.count_in, half_close=False)

    async def _copy_body(self) -> None:
        """The request body as h11 frames it, framed afresh by us (the same length, or our
        own chunks), and nothing after it."""
        up = self.upstream
        assert up is not None
        chunked = self.parser.framing[0] == "chunked"
        self.parser.feed(self.reader.take())
        while True:
            piece = self.parser.next_body()
            if piece is None:
                data = await self.loop.sock_recv(self.client, READ_CHUNK)
                if not data:
                    raise IncompleteRead(b"")
                self.parser.feed(data)
            elif isinstance(piece, bytes):
                if piece:
                    await self._send(up, chunk(piece) if chunked else piece, self.job.count_out)
            else:
                if chunked:
                    await self._send(up, last_chunk(piece), self.job.count_out)
                return

    async def _answer(self, response: bytes) -> None:
        """Send an error response, then a lingering close: the job's unread bytes are drained
        for a moment, so closing does not reset the connection before it reads the answer."""
        with contextlib.suppress(OSError, IncompleteRead), anyio.move_on_after(LINGER):
            await self.loop.sock_sendall(self.client, response)
            self.client.shutdown(socket.SHUT_WR)
            drained = 0
            while drained < MAX_HEAD:
                drained += len(await self.reader.read(READ_CHUNK))
