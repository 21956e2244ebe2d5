"""The egress proxy: the only way a job with `net.fetch` reaches the network.

Every worker lives in one empty network namespace. For a job whose lease holds
`net.fetch`, the fork server opens a listening TCP socket on that namespace's
loopback and hands the descriptor to the supervisor, which accepts on it; the
job's `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` name that port, and Landlock lets
the job connect to that one port and no other. So every byte the job sends
off its loopback arrives here, in the supervisor, which parses the request
(bounded in size and time), judges it by the lease (`egress_policy`), resolves
names itself, connects, and relays, counting bytes both ways.

Heads are read and answered on the event loop; once a request is allowed, the
bytes that follow (a tunnel both ways, a response body) are spliced by relay
threads (egress_relay), never copied through the loop. Refusals answer HTTP 403
with a body naming the lease and the URL, and give the job a `warn` log event;
the job goes on. Every connection of a job is closed when the job ends, before
its terminal frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from supervisor.authority import Authority
from supervisor.egress_policy import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    Destination,
    HeadError,
    IPAddress,
    Refusal,
    RequestHead,
    body_framing,
    check_host_header,
    check_lease,
    destination_of,
    error_response,
    parse_header_line,
    parse_request_line,
    response_head,
    upstream_head,
    usable_addresses,
)
from supervisor.egress_relay import Relay

log = logging.getLogger("arcp.egress")

CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
METRIC_INTERVAL = 0.5  # seconds between byte-count metrics while data flows
READ_CHUNK = 64 * 1024
LOOP_COPY = 256 * 1024  # bytes a stream is copied on the loop before a relay thread takes over
MAX_CHUNK_LINE = 4096
MAX_CONNECTIONS = 128  # open proxy connections per job
LINGER = 1.0  # seconds an error response waits for the job to stop sending

Emit = Callable[[str, dict[str, Any]], None]


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The supervisor's resolver: every address of `host`, in the order the system gives."""
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT)
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, addr in infos:
        ip = ipaddress.ip_address(str(addr[0]).partition("%")[0])
        if ip not in out:
            out.append(ip)
    return out


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


class EgressJob:
    """One job's use of the proxy: its authority, byte counters and open connections."""

    def __init__(self, job_id: str, authority: Authority, emit: Emit, header_timeout: float,
                 resolver: Callable[[str, int], Any] = resolve) -> None:
        self.job_id = job_id
        self.authority = authority
        self.emit = emit
        self.header_timeout = header_timeout
        self.resolver = resolver
        self.bytes_in = self.bytes_out = 0  # from the network to the job, and back
        self._reported_in = self._reported_out = 0
        self._flush: asyncio.TimerHandle | None = None
        self.exchanges: set[Exchange] = set()
        self.closed = False
        self.overflow_logged = False
        self.requests = self.refused = 0

    def count(self, inbound: int, outbound: int) -> None:
        self.bytes_in += inbound
        self.bytes_out += outbound
        if self._flush is None and not self.closed:
            self._flush = asyncio.get_running_loop().call_later(METRIC_INTERVAL, self.report)

    def count_in(self, n: int) -> None:
        self.count(n, 0)

    def count_out(self, n: int) -> None:
        self.count(0, n)

    def report(self) -> None:
        """Byte-count metrics for what moved since the last report (their sum is the total)."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        d_in, d_out = self.bytes_in - self._reported_in, self.bytes_out - self._reported_out
        if d_in or d_out:
            self._reported_in, self._reported_out = self.bytes_in, self.bytes_out
            self.emit("metric", {"name": "net.bytes_in", "value": d_in, "unit": "bytes"})
            self.emit("metric", {"name": "net.bytes_out", "value": d_out, "unit": "bytes"})

    def refuse(self, url: str, reason: str) -> None:
        self.refused += 1
        self.emit("log", {"level": "warn", "message": f"egress refused: {url}: {reason}"})

    def close(self) -> None:
        """The job is ending: report the last bytes, then cut every connection it has."""
        if self.closed:
            return
        for ex in self.exchanges:
            for relay in ex.relays:
                relay.flush()
        self.report()
        self.closed = True
        for ex in list(self.exchanges):
            ex.abort()


class EgressListener:
    """The proxy's end of one worker's listening socket; it serves the worker's current job."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.job: EgressJob | None = None
        self._accepting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.sock.setblocking(False)
        self._accepting = asyncio.get_running_loop().create_task(self._accept_loop())

    def close(self) -> None:
        if self.job is not None:
            self.job.close()
            self.job = None
        if self._accepting is not None:
            self._accepting.cancel()
            self._accepting = None
            with contextlib.suppress(RuntimeError, ValueError):  # before the descriptor number is freed
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:  # EMFILE and the like: back off, then go on
                log.warning("egress port %d: accept failed: %s", self.port, e)
                await asyncio.sleep(0.1)
                continue
            job = self.job
            if job is None or job.closed:  # between jobs, or after the job ended
                conn.close()
                continue
            conn.setblocking(False)
            if len(job.exchanges) >= MAX_CONNECTIONS:  # each holds two of our descriptors
                with contextlib.suppress(OSError):
                    conn.send(error_response(429, f"arcp-supervisor egress proxy: more than {MAX_CONNECTIONS} "
                                                  "open connections for this job"))
                conn.close()
                if not job.overflow_logged:
                    job.overflow_logged = True
                    job.emit("log", {"level": "warn", "message": f"egress: connections over {MAX_CONNECTIONS} "
                                                                 "at once are refused (429)"})
                continue
            ex = Exchange(job, conn)
            job.exchanges.add(ex)
            ex.task = loop.create_task(ex.serve())


class Exchange:
    """One proxy connection from a job: one request (or one tunnel), then close."""

    def __init__(self, job: EgressJob, client: socket.socket) -> None:
        self.job = job
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.reader = SocketReader(self.loop, client)
        self.upstream: socket.socket | None = None
        self.relays: list[Relay] = []
        self.task: asyncio.Task[None] | None = None

    def abort(self) -> None:
        """Cut the connection now: wakes the relays (their splices end) and the task."""
        for s in (self.client, self.upstream):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        if self.task is not None:
            self.task.cancel()

    async def serve(self) -> None:
        job = self.job
        try:
            await self.run()
        except HeadError as e:  # a bad body or response after the checks: say so if we still can
            await self._answer(error_response(e.status, f"arcp-supervisor egress proxy: {e.message}"))
        except (OSError, IncompleteRead, asyncio.CancelledError):
            pass
        except Exception:  # a proxy fault ends this connection, never the supervisor
            log.exception("job %s: egress connection failed", job.job_id)
        finally:
            running = [r.done for r in self.relays if not r.done.done()]
            if running:  # their sockets were shut down: they end at once
                for s in (self.client, self.upstream):
                    if s is not None:
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)
                await asyncio.wait(running, timeout=5)
            if all(r.done.done() for r in self.relays):  # never close a descriptor a relay may still use
                self.client.close()
                if self.upstream is not None:
                    self.upstream.close()
            else:
                log.error("job %s: an egress relay did not stop; its sockets are left open", job.job_id)
            job.exchanges.discard(self)
            if not job.closed:
                job.report()

    async def run(self) -> None:
        job = self.job
        dest: Destination | None = None
        try:
            try:
                head = await asyncio.wait_for(self._read_head(), job.header_timeout)
            except TimeoutError:
                raise HeadError(408, f"request head not received within {job.header_timeout:g} s") from None
            dest = destination_of(head)
            check_host_header(head, dest)
            framing = ("none", 0) if dest.tunnel else body_framing(head)
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
            await asyncio.gather(self._pump(self.client, self.upstream, job.count_out, half_close=True),
                                 self._pump(self.upstream, self.client, job.count_in, half_close=True))
        else:
            await self._forward(head, dest, framing)

    async def _read_head(self) -> RequestHead:
        r = self.reader
        line = await r.readuntil(b"\n", MAX_REQUEST_LINE, 414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        head = parse_request_line(line)
        total = len(line)
        while True:
            line = await r.readuntil(b"\n", MAX_HEAD, 431, f"request head longer than {MAX_HEAD} bytes")
            total += len(line)
            if total > MAX_HEAD:
                raise HeadError(431, f"request head longer than {MAX_HEAD} bytes")
            if line in (b"\r\n", b"\n"):
                return head
            parse_header_line(head, line)

    async def _resolve(self, dest: Destination) -> list[IPAddress]:
        try:
            addresses = list(await self.job.resolver(dest.host, dest.port))
        except (OSError, TimeoutError, UnicodeError) as e:
            raise HeadError(502, f"cannot resolve {dest.host}: {e}") from None
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
                await asyncio.wait_for(self.loop.sock_connect(s, (str(ip), dest.port)), CONNECT_TIMEOUT)
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
        await relay.done

    async def _forward(self, head: RequestHead, dest: Destination, framing: tuple[str, int]) -> None:
        job = self.job
        up = self.upstream
        assert up is not None
        await self._send(up, upstream_head(head, dest), job.count_out)
        kind, length = framing
        if kind == "length":
            await self._copy_exact(length)
        elif kind == "chunked":
            await self._copy_chunked()
        up_reader = SocketReader(self.loop, up)
        while True:  # interim 1xx responses, then the final head
            try:
                raw = await up_reader.readuntil(b"\r\n\r\n", MAX_HEAD, 502, "the origin's response head is too long")
            except IncompleteRead as e:
                if not e.args[0]:
                    await self._answer(error_response(502, "arcp-supervisor egress proxy: the origin closed "
                                                           "the connection without a response"))
                    return
                raise
            rewritten, interim = response_head(raw)
            job.count_in(len(raw))
            await self._send(self.client, rewritten, None)
            if not interim:
                break
        rest = up_reader.take()
        if rest:
            await self._send(self.client, rest, job.count_in)
        await self._pump(up, self.client, job.count_in, half_close=False)

    async def _copy_exact(self, n: int) -> None:
        up = self.upstream
        assert up is not None
        while n > 0:
            data = await self.reader.read(min(n, READ_CHUNK))
            n -= len(data)
            await self._send(up, data, self.job.count_out)

    async def _copy_chunked(self) -> None:
        """Forward a chunked body exactly, and nothing after it."""
        up = self.upstream
        assert up is not None
        r = self.reader
        while True:
            line = await r.readuntil(b"\n", MAX_CHUNK_LINE, 400, "chunk size line too long")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HeadError(400, f"malformed chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise HeadError(400, "negative chunk size")
            await self._send(up, line, self.job.count_out)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = await r.readuntil(b"\n", MAX_CHUNK_LINE, 400, "trailer line too long")
                    await self._send(up, t, self.job.count_out)
                    if t in (b"\r\n", b"\n"):
                        return
            await self._copy_exact(size)
            end = await r.readuntil(b"\n", MAX_CHUNK_LINE, 400, "malformed chunk end")
            await self._send(up, end, self.job.count_out)

    async def _answer(self, response: bytes) -> None:
        """Send an error response, then a lingering close: the job's unread bytes are drained
        for a moment, so closing does not reset the connection before it reads the answer."""
        with contextlib.suppress(OSError, TimeoutError, IncompleteRead):
            async with asyncio.timeout(LINGER):
                await self.loop.sock_sendall(self.client, response)
                self.client.shutdown(socket.SHUT_WR)
                drained = 0
                while drained < MAX_HEAD:
                    drained += len(await self.reader.read(READ_CHUNK))
