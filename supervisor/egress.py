"""The egress proxy: the only way a job with `net.fetch` reaches the network.

Every worker lives in one empty network namespace. For a job whose lease holds
`net.fetch`, the fork server opens a listening TCP socket on that namespace's
loopback and hands the descriptor to the supervisor, which accepts on it; the
job's `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` name that port, and Landlock lets
the job connect to that one port and no other. So every byte the job sends
off its loopback arrives here, in the supervisor, which parses the request
(bounded in size and time), judges it by the lease (`egress_policy`), resolves
names itself, connects, and relays, counting bytes both ways.

Refusals answer HTTP 403 with a body naming the lease and the URL, and give the
job a `warn` log event; the job goes on. Every connection of a job is closed
when the job ends, before its terminal frame.
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
    MAX_HEAD, MAX_REQUEST_LINE, Destination, HeadError, IPAddress, Refusal, RequestHead, body_framing,
    check_host_header, check_lease, destination_of, error_response, parse_header_line, parse_request_line,
    response_head, upstream_head, usable_addresses,
)

log = logging.getLogger("arcp.egress")

CONNECT_TIMEOUT = 10.0
RESOLVE_TIMEOUT = 10.0
METRIC_INTERVAL = 0.5  # seconds between byte-count metrics while data flows
RELAY_CHUNK = 256 * 1024
MAX_CHUNK_LINE = 4096
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
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.requests = self.refused = 0

    def count(self, inbound: int, outbound: int) -> None:
        self.bytes_in += inbound
        self.bytes_out += outbound
        if self._flush is None and not self.closed:
            self._flush = asyncio.get_running_loop().call_later(METRIC_INTERVAL, self.report)

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
        self.report()
        self.closed = True
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()
        for t in list(self.tasks):
            t.cancel()


class EgressListener:
    """The proxy's end of one worker's listening socket; it serves the worker's current job."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.job: EgressJob | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, sock=self.sock, limit=MAX_HEAD)

    def close(self) -> None:
        if self.job is not None:
            self.job.close()
            self.job = None
        if self._server is not None:
            self._server.close()
            self._server = None
        else:
            self.sock.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        job = self.job
        if job is None or job.closed:  # between jobs, or after the job ended
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        job.tasks.add(task)
        job.writers.add(writer)
        try:
            await Exchange(job, reader, writer).run()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        except Exception:  # a proxy fault ends this connection, never the supervisor
            log.exception("job %s: egress connection failed", job.job_id)
        finally:
            job.tasks.discard(task)
            job.writers.discard(writer)
            writer.transport.abort() if job.closed else writer.close()
            if not job.closed:
                job.report()


class Exchange:
    """One proxy connection from a job: one request (or one tunnel), then close."""

    def __init__(self, job: EgressJob, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.job = job
        self.reader = reader
        self.writer = writer
        self.upstream: asyncio.StreamWriter | None = None

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
            up_reader, up_writer = await self._connect(dest, addresses)
        except OSError as e:
            await self._answer(error_response(502, f"arcp-supervisor egress proxy: cannot connect to "
                                                   f"{dest.authority}: {e}"))
            return
        self.upstream = up_writer
        job.writers.add(up_writer)
        try:
            if dest.tunnel:
                self.writer.write(b"HTTP/1.1 200 Connection established\r\nProxy-Agent: arcp-supervisor\r\n\r\n")
                await asyncio.gather(self._relay(self.reader, up_writer, outbound=True),
                                     self._relay(up_reader, self.writer, outbound=False))
            else:
                await self._forward(head, dest, framing, up_reader, up_writer)
        finally:
            job.writers.discard(up_writer)
            up_writer.transport.abort() if job.closed else up_writer.close()

    async def _read_head(self) -> RequestHead:
        line = await self._line(MAX_REQUEST_LINE, 414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        head = parse_request_line(line)
        total = len(line)
        while True:
            line = await self._line(MAX_HEAD, 431, f"request head longer than {MAX_HEAD} bytes")
            total += len(line)
            if total > MAX_HEAD:
                raise HeadError(431, f"request head longer than {MAX_HEAD} bytes")
            if line in (b"\r\n", b"\n"):
                return head
            parse_header_line(head, line)

    async def _line(self, limit: int, status: int, message: str) -> bytes:
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise HeadError(status, message) from None
        if len(line) > limit:
            raise HeadError(status, message)
        return line

    async def _resolve(self, dest: Destination) -> list[IPAddress]:
        try:
            addresses = list(await self.job.resolver(dest.host, dest.port))
        except (OSError, TimeoutError, UnicodeError) as e:
            raise HeadError(502, f"cannot resolve {dest.host}: {e}") from None
        if not addresses:
            raise HeadError(502, f"cannot resolve {dest.host}: no address")
        return addresses

    async def _connect(self, dest: Destination, addresses: list[IPAddress]
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: OSError = OSError(f"no address for {dest.host}")
        for ip in addresses:  # the checked addresses, never a second lookup
            try:
                return await asyncio.wait_for(asyncio.open_connection(str(ip), dest.port, limit=MAX_HEAD),
                                              CONNECT_TIMEOUT)
            except TimeoutError:
                last = OSError(f"timed out after {CONNECT_TIMEOUT:g} s")
            except OSError as e:
                last = e
        raise last

    async def _forward(self, head: RequestHead, dest: Destination, framing: tuple[str, int],
                       up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        out = upstream_head(head, dest)
        up_writer.write(out)
        self.job.count(0, len(out))
        kind, length = framing
        if kind == "length":
            await self._copy_exact(self.reader, up_writer, length)
        elif kind == "chunked":
            await self._copy_chunked(self.reader, up_writer)
        await up_writer.drain()
        while True:  # interim 1xx responses, then the final head
            try:
                raw = await up_reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise HeadError(502, "the origin's response head is too long") from None
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    await self._answer(error_response(502, "arcp-supervisor egress proxy: the origin closed "
                                                           "the connection without a response"))
                    return
                raise
            rewritten, interim = response_head(raw)
            self.job.count(len(raw), 0)
            self.writer.write(rewritten)
            if not interim:
                break
        await self._relay(up_reader, self.writer, outbound=False)

    async def _copy_exact(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, n: int) -> None:
        while n > 0:
            data = await src.read(min(n, RELAY_CHUNK))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            n -= len(data)
            self.job.count(0, len(data))
            dst.write(data)
            await dst.drain()

    async def _copy_chunked(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Forward a chunked body exactly, and nothing after it."""
        while True:
            line = await src.readuntil(b"\n")
            if len(line) > MAX_CHUNK_LINE:
                raise HeadError(400, "chunk size line too long")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HeadError(400, f"malformed chunk size {size_text[:20]!r}") from None
            if size < 0:
                raise HeadError(400, "negative chunk size")
            dst.write(line)
            self.job.count(0, len(line))
            if size == 0:
                while True:  # trailers, then the empty line
                    t = await src.readuntil(b"\n")
                    dst.write(t)
                    self.job.count(0, len(t))
                    if t in (b"\r\n", b"\n"):
                        return
            await self._copy_exact(src, dst, size)
            end = await src.readuntil(b"\n")
            dst.write(end)
            self.job.count(0, len(end))

    async def _relay(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, outbound: bool) -> None:
        job = self.job
        try:
            while True:
                data = await src.read(RELAY_CHUNK)
                if not data:
                    break
                if outbound:
                    job.count(0, len(data))
                else:
                    job.count(len(data), 0)
                dst.write(data)
                await dst.drain()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()

    async def _answer(self, response: bytes) -> None:
        """Send an error response, then a lingering close: the job's unread bytes are drained
        for a moment, so closing does not reset the connection before it reads the answer."""
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.writer.write(response)
            await asyncio.wait_for(self.writer.drain(), LINGER)
            if self.writer.can_write_eof():
                self.writer.write_eof()
            async with asyncio.timeout(LINGER):
                drained = 0
                while drained < MAX_HEAD and (data := await self.reader.read(MAX_HEAD)):
                    drained += len(data)
