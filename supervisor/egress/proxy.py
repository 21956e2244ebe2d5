"""The egress proxy: the only way a job with `net.fetch` reaches the network.

Every worker lives in one empty network namespace. For a job whose lease holds
`net.fetch`, the fork server opens a listening TCP socket on that namespace's
loopback and hands the descriptor to the supervisor, which accepts on it; the
job's `HTTP_PROXY`/`HTTPS_PROXY`/`ALL_PROXY` name that port, and Landlock lets
the job connect to that one port and no other. So every byte the job sends
off its loopback arrives here, in the supervisor, which parses the request
(bounded in size and time), judges it by the lease (`policy`), resolves names
itself (off the event loop), connects, and relays, counting bytes both ways.

Heads are read on the event loop and parsed by h11, a sans-I/O HTTP/1.1 parser
(`messages`); a request body is framed by h11 and framed afresh by us on its
way upstream, and the origin's response head is parsed by h11 and written
afresh. Once the response head is through, its body (and a tunnel both ways) is
spliced by relay threads (`relay`), never copied through the loop. Open
connections are capped per job and in all (`caps`), from the supervisor's
descriptor limit; beyond a cap the answer is 429. Refusals answer HTTP 403 with
a body naming the lease and the URL, and give the job a `warn` log event; the
job goes on. Every connection of a job is closed when the job ends, before its
terminal frame.

Who runs what. A worker's `EgressListener` accepts for as long as the worker
lives, from a reader callback on the loop (no task of its own): a connection
is refused at once between jobs or over a cap, and otherwise handed to the job
the worker runs now. That job's `EgressJob.run()`, which the job's runner runs
in its own task group for the job's life, owns one task group in which every
connection is a task (`exchange.Exchange.serve`). `EgressJob.close()` cuts the
job's connections and cancels that task group; `run()` then returns once every
exchange has ended, each within `exchange.RELAY_STOP`. Nothing the proxy starts is
left running after its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from supervisor import metrics
from supervisor.core.authority import Authority
from supervisor.egress.caps import connection_caps, refused_over_cap
from supervisor.egress.exchange import Emit, Exchange
from supervisor.egress.messages import IPAddress

log = logging.getLogger("arcp.egress")

METRIC_INTERVAL = 0.5  # seconds between byte-count metrics while data flows
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listener, before others get the loop
ACCEPT_BACKOFF = 0.1  # seconds the listener rests after accept() failed (EMFILE and the like)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """The supervisor's resolver: every address of `host`, in the order the system gives.
    getaddrinfo runs in a worker thread, never on the event loop; the exchange bounds the wait."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IPAddress] = []
    for _family, _type, _proto, _canon, addr in infos:
        ip = ipaddress.ip_address(str(addr[0]).partition("%")[0])
        if ip not in out:
            out.append(ip)
    return out


class EgressJob:
    """One job's use of the proxy: its authority, byte counters and connections.

    The connections are served by `run()`, which the job's runner runs in a task group of
    its own while the job runs; `close()` (the job is ending) cuts them and cancels
    run()'s task group. A connection handed over before run() starts waits for it."""

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
        self.exchanges: set[Exchange] = set()  # served or waiting to be: each holds a slot of the caps
        self.closed = False
        self.overflow_logged: set[str] = set()  # which caps this job has been told about
        self.requests = self.refused = 0
        self._handed: MemoryObjectSendStream[Exchange]
        self._queued: MemoryObjectReceiveStream[Exchange]
        self._handed, self._queued = anyio.create_memory_object_stream[Exchange](math.inf)
        self._serving: anyio.CancelScope | None = None  # run()'s task group's scope, while it runs
        self._tasks: TaskGroup | None = None  # run()'s task group, once it has taken what waited

    def admit(self, conn: socket.socket) -> None:
        """A connection from the job, under its caps: a task of run()'s task group serves it,
        started here (no hop through run()'s queue) once run() runs; until then it waits."""
        ex = Exchange(self, conn)
        self.exchanges.add(ex)
        if self._tasks is not None:
            self._tasks.start_soon(ex.serve, name=f"egress exchange {self.job_id}")
        else:
            self._handed.send_nowait(ex)

    async def run(self) -> None:
        """Serve the job's connections, each in a task of this task group, until `close()`;
        return once every one has ended (an exchange's clean-up waits RELAY_STOP s at most).
        Cancelled by its owner, it closes the job likewise. It never raises but cancellation:
        a fault here ends the job's connections, never the task group of its owner."""
        try:
            async with anyio.create_task_group() as tg:
                self._serving = tg.cancel_scope
                if self.closed:
                    tg.cancel_scope.cancel()
                self._tasks = tg  # from now on admit() starts each connection's task itself
                async for ex in self._queued:  # those handed over before; then it waits for the close
                    tg.start_soon(ex.serve, name=f"egress exchange {self.job_id}")
        except Exception:
            log.exception("job %s: the egress proxy failed; the job's connections are cut", self.job_id)
        finally:
            self._tasks = None
            self._serving = None
            self.close()
            for ex in list(self.exchanges):  # their tasks were cancelled before they ever ran
                ex.release()

    def count(self, inbound: int, outbound: int) -> None:
        self.bytes_in += inbound
        self.bytes_out += outbound
        self.report_soon()

    def report_soon(self) -> None:
        """A report within METRIC_INTERVAL (one already due stays): the bytes of many short
        connections go out as one pair of metric events, not a pair per connection."""
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
        """The job is ending: report the last bytes, then cut every connection it has and
        cancel their tasks. It does not wait: run() returns once they have ended (bounded)."""
        if self.closed:
            return
        for ex in self.exchanges:
            for relay in ex.relays:
                relay.flush()
        self.report()
        self.closed = True
        self._handed.close()
        while True:  # handed over and not yet picked up by run()
            try:
                self._queued.receive_nowait().release()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        for ex in list(self.exchanges):
            ex.abort()
        if self._serving is not None:
            self._serving.cancel()


class EgressListener:
    """The proxy's end of one worker's listening socket, for the worker's life; it hands
    each connection to the job the worker runs now (`job`), or closes it at once."""

    def __init__(self, sock: socket.socket, port: int) -> None:
        self.sock = sock
        self.port = port
        self.job: EgressJob | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None  # after a failed accept()
        self.closed = False

    async def start(self) -> None:
        """Accept from now on: a reader callback on the running loop, not a task."""
        connection_caps()
        self.sock.setblocking(False)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.job is not None:
            self.job.close()
            self.job = None
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._loop is not None and not self.closed:
            with contextlib.suppress(RuntimeError, ValueError, OSError):  # before the descriptor number is freed
                self._loop.remove_reader(self.sock.fileno())
        self.closed = True
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: back off, then go on
                log.warning("egress port %d: accept failed: %s", self.port, e)
                self._pause()
                return
            try:
                self._hand_over(conn)
            except Exception:  # a proxy fault refuses this connection, never the next one
                log.exception("egress port %d: a connection could not be handed over", self.port)
                conn.close()

    def _hand_over(self, conn: socket.socket) -> None:
        job = self.job
        if job is None or job.closed:  # between jobs, or after the job ended
            conn.close()
            return
        conn.setblocking(False)
        if refused_over_cap(job, conn):
            conn.close()
            return
        job.admit(conn)

    def _pause(self) -> None:
        loop = self._loop
        if loop is None or self.closed:
            return
        loop.remove_reader(self.sock.fileno())

        def resume() -> None:
            self._resume = None
            if not self.closed:
                loop.add_reader(self.sock.fileno(), self._accept)
        self._resume = loop.call_later(ACCEPT_BACKOFF, resume)
