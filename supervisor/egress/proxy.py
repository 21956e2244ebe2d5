"""The egress proxy: the only way a job with `net.fetch` reaches the network.

Every worker lives in one empty network namespace. For a job whose lease holds
`net.fetch`, the fork server opens a listening TCP socket on that namespace's
loopback and hands the descriptor to the supervisor, which accepts on it; the
job's `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` name that port, and Landlock lets
the job connect to that one port and no other. So every byte the job sends
off its loopback arrives here, in the supervisor, which parses the request
(bounded in size and time), judges it by the lease (`egress_policy`), resolves
names itself, connects, and relays, counting bytes both ways.

Heads are read on the event loop and parsed by h11, a sans-I/O HTTP/1.1 parser
(egress_policy); a request body is framed by h11 and framed afresh by us on its
way upstream, and the origin's response head is parsed by h11 and written
afresh. Once the response head is through, its body (and a tunnel both ways) is
spliced by relay threads (egress_relay), never copied through the loop. Open
connections are capped per job and in all (ConnectionCaps), from the
supervisor's descriptor limit; beyond a cap the answer is 429. Refusals answer HTTP 403
with a body naming the lease and the URL, and give the job a `warn` log event;
the job goes on. Every connection of a job is closed when the job ends, before
its terminal frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from supervisor import metrics
from supervisor.core.authority import Authority
from supervisor.egress.policy import (
    MAX_HEAD,
    MAX_REQUEST_LINE,
    Destination,
    HeadError,
    IPAddress,
    Refusal,
    RequestHead,
    RequestParser,
    ResponseParser,
    check_host_header,
    check_lease,
    chunk,
    destination_of,
    error_response,
    last_chunk,
    upstream_head,
    usable_addresses,
)
from supervisor.egress.relay import Relay

log = logging.getLogger("arcp.egress")

CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
METRIC_INTERVAL = 0.5  # seconds between byte-count metrics while data flows
READ_CHUNK = 64 * 1024
LOOP_COPY = 256 * 1024  # bytes a stream is copied on the loop before a relay thread takes over
LINGER = 1.0  # seconds an error response waits for the job to stop sending
MAX_PER_JOB = 128  # open proxy connections per job, whatever the descriptor limit
FDS_PER_CONNECTION = 6  # the job's socket, the origin's, and a splice pipe (2) per relay thread (2 for a tunnel)
EGRESS_SHARE = 2  # the proxy may hold 1/EGRESS_SHARE of the supervisor's descriptors
JOB_SHARE = 8  # and one job at most 1/JOB_SHARE of the proxy's connections
CAP_WARN_INTERVAL = 10.0  # seconds between supervisor log lines about the global cap

Emit = Callable[[str, dict[str, Any]], None]


@dataclass
class ConnectionCaps:
    """How many proxy connections may be open at once, in all and per job, from the
    supervisor's RLIMIT_NOFILE soft limit (read once, when the first job with `net.fetch`
    starts: after `raise_open_files_limit`).

    Each connection may hold FDS_PER_CONNECTION descriptors at its peak (a tunnel: two
    sockets and two relay threads with a pipe each). Sessions, worker pipes and pidfds,
    cgroup files, the store and every worker's egress listener need the rest, so the proxy
    gets half the limit: total = limit // 12. A job gets at most an eighth of that (so at
    least eight jobs at their cap fit at once) and never more than 128: per_job =
    min(128, total // 8), at least 1. At the usual hard limit (2^20) that is 87381 and
    128; at 1024, 85 and 10. Beyond either cap a connection is answered 429 at once, so the
    supervisor never runs out of descriptors because of the proxy."""

    nofile: int
    total: int
    per_job: int
    open: int = 0  # proxy connections open now, across all jobs

    @classmethod
    def for_limit(cls, nofile: int) -> ConnectionCaps:
        total = max(1, nofile // (EGRESS_SHARE * FDS_PER_CONNECTION))
        return cls(nofile, total, max(1, min(MAX_PER_JOB, total // JOB_SHARE)))

    @classmethod
    def from_rlimit(cls) -> ConnectionCaps:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft > 1 << 30:
            soft = 1 << 30
        return cls.for_limit(soft)


_caps: ConnectionCaps | None = None
_cap_warned = 0.0


def connection_caps() -> ConnectionCaps:
    global _caps
    if _caps is None:
        _caps = ConnectionCaps.from_rlimit()
        log.info("egress proxy: at most %d connections at once, %d per job (RLIMIT_NOFILE %d)",
                 _caps.total, _caps.per_job, _caps.nofile)
    return _caps


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
        self.overflow_logged: set[str] = set()  # which caps this job has been told about
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
            metrics.egress_bytes(d_in, d_out)
            self.emit("metric", {"name": "net.bytes_in", "value": d_in, "unit": "bytes"})
            self.emit("metric", {"name": "net.bytes_out", "value": d_out, "unit": "bytes"})

    def refuse(self, url: str, reason: str) -> None:
        self.refused += 1
        metrics.egress_refused()
        self.emit("log", {"level": "warn", "message": f"egress refused: {url}: {reason}"})

    def over_cap(self, which: str, message: str) -> None:
        """A connection was refused with 429: one `warn` event per job and cap."""
        if which not in self.overflow_logged:
            self.overflow_logged.add(which)
            self.emit("log", {"level": "warn", "message": message})

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
        connection_caps()
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
            if self._over_cap(job, conn):
                conn.close()
                continue
            ex = Exchange(job, conn)
            job.exchanges.add(ex)
            ex.task = loop.create_task(ex.serve())
            ex.task.add_done_callback(ex.released)

    @staticmethod
    def _over_cap(job: EgressJob, conn: socket.socket) -> bool:
        """Answer 429 when the job or the whole proxy is at its cap (ConnectionCaps)."""
        global _cap_warned
        caps = connection_caps()
        if len(job.exchanges) >= caps.per_job:
            text = f"more than {caps.per_job} open connections for this job"
            job.over_cap("job", f"egress: connections over {caps.per_job} at once are refused (429)")
        elif caps.open >= caps.total:
            text = f"all {caps.total} connections of the supervisor's egress proxy are in use"
            job.over_cap("total", f"egress: refused (429): {text}")
            now = time.monotonic()
            if now - _cap_warned > CAP_WARN_INTERVAL:
                _cap_warned = now
                log.warning("egress proxy: %s (RLIMIT_NOFILE %d); refusing with 429", text, caps.nofile)
        else:
            return False
        metrics.egress_refused()
        with contextlib.suppress(OSError):
            conn.send(error_response(429, f"arcp-supervisor egress proxy: {text}"))
            conn.shutdown(socket.SHUT_WR)
            conn.recv(MAX_HEAD)  # what the job sent already: closing on unread bytes would reset the answer
        return True


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
        self.parser = RequestParser()
        self.caps = connection_caps()
        self.caps.open += 1
        self.counted = True  # in caps.open until its descriptors are closed

    def released(self, _task: asyncio.Task[None]) -> None:
        """The task is over; if it was cancelled before it ran, nothing closed the job's socket
        or left the count: do it here."""
        self.job.exchanges.discard(self)
        if self.counted and not self.relays:
            self.counted = False
            self.caps.open -= 1
            self.client.close()
            if self.upstream is not None:
                self.upstream.close()

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
            what = "bad request from the job: " if e.status < 500 else ""
            job.emit("log", {"level": "warn", "message": f"egress: {what}{e.message}"})
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
                if self.counted:
                    self.counted = False
                    self.caps.open -= 1
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
            await self._forward(head, dest)

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
        with contextlib.suppress(OSError, TimeoutError, IncompleteRead):
            async with asyncio.timeout(LINGER):
                await self.loop.sock_sendall(self.client, response)
                self.client.shutdown(socket.SHUT_WR)
                drained = 0
                while drained < MAX_HEAD:
                    drained += len(await self.reader.read(READ_CHUNK))
