"""The egress proxy's I/O, in-process: a listener on 127.0.0.1, a local origin, a fake resolver.

The resolver is a test double, so names that would resolve to metadata or
private addresses are refused without any lookup or connection leaving this host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from supervisor.async_library import declare_asyncio
from supervisor.egress import caps as egress
from supervisor.core.authority import Authority
from supervisor.egress.proxy import EgressJob, EgressListener

ip = ipaddress.ip_address


class FakeResolver:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> list[Any]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"unknown name {host}")
        return [ip(a) for a in self.table[host]]


class Origin:
    """A raw origin: records every byte it receives, answers one canned response per connection."""

    def __init__(self, response: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"):
        self.response = response
        self.received: list[bytes] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        buf = b""
        try:
            async with asyncio.timeout(2):
                while b"\r\n\r\n" not in buf:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    buf += chunk
                await asyncio.sleep(0.1)  # whatever else the proxy forwards arrives now
                while True:
                    try:
                        chunk = await asyncio.wait_for(reader.read(65536), 0.05)
                    except TimeoutError:
                        break
                    if not chunk:
                        break
                    buf += chunk
        except TimeoutError:
            pass
        self.received.append(buf)
        if self.response:
            writer.write(self.response)
        await writer.drain()
        writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


class Proxy:
    def __init__(self, lease: dict[str, Any], resolver: FakeResolver, header_timeout: float = 5.0) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.resolver = resolver
        self.job = EgressJob("job_test", Authority(lease, None), lambda k, b: self.events.append((k, b)),
                             header_timeout, resolver)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        self.listener = EgressListener(sock, sock.getsockname()[1])
        self.listener.job = self.job

    async def request(self, raw: bytes, read_timeout: float = 5.0) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.listener.port)
        writer.write(raw)
        await writer.drain()
        out = b""
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                out += chunk
        writer.close()
        return out

    def warns(self) -> list[str]:
        return [b["message"] for k, b in self.events if k == "log" and b["level"] == "warn"]

    def metric(self, name: str) -> int:
        return sum(b["value"] for k, b in self.events if k == "metric" and b["name"] == name)


@asynccontextmanager
async def proxy(lease: dict[str, Any], table: dict[str, list[str]] | None = None,
                header_timeout: float = 5.0) -> AsyncIterator[Proxy]:
    """A listener and its job, whose connections are served by `run()` in a task group
    here, as the job's runner does; leaving closes both and waits for run() to end."""
    p = Proxy(lease, FakeResolver(table or {}), header_timeout)
    await p.listener.start()
    async with anyio.create_task_group() as tg:
        tg.start_soon(p.job.run)
        try:
            yield p
        finally:
            p.listener.close()


def run(coro: Any) -> Any:
    async def owner() -> Any:  # as the runtime's owner does: the proxy starts tasks from its accept callback
        declare_asyncio()
        return await asyncio.wait_for(coro, 30)
    return asyncio.run(owner())


async def until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


def test_a_name_resolving_to_the_metadata_address_is_refused_before_any_connection() -> None:
    async def go() -> None:
        table = {"metadata.test": ["169.254.169.254"], "intranet.test": ["10.0.0.7", "fd00::7"]}
        async with proxy({"net.fetch": ["http://*.test/**"]}, table) as p:
            for host in ("metadata.test", "intranet.test"):
                out = await p.request(f"GET http://{host}/latest HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                assert out.startswith(b"HTTP/1.1 403") and host.encode() in out and b"net.fetch" in out, out
            assert p.resolver.asked == ["metadata.test", "intranet.test"]
            assert len(p.warns()) == 2 and "metadata" in p.warns()[0] and "private" in p.warns()[1]
    run(go())


def test_a_named_host_may_reach_its_loopback_address_and_the_origin_sees_origin_form() -> None:
    async def go() -> None:
        origin = Origin()
        await origin.start()
        try:
            table = {"svc.test": ["127.0.0.1"]}
            async with proxy({"net.fetch": [f"http://svc.test:{origin.port}/**"]}, table) as p:
                out = await p.request(f"GET http://svc.test:{origin.port}/x HTTP/1.1\r\n"
                                      f"Host: svc.test:{origin.port}\r\nProxy-Connection: keep-alive\r\n\r\n".encode())
                assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in out
                assert out.endswith(b"\r\n\r\nok") and b"keep-alive" not in out
                sent = origin.received[0]
                assert sent.startswith(b"GET /x HTTP/1.1\r\n") and b"Proxy-Connection" not in sent
            # reported within METRIC_INTERVAL, and what is left when the job closes
            assert p.metric("net.bytes_in") == len(origin.response) and p.metric("net.bytes_out") == len(sent)
        finally:
            origin.close()
    run(go())


def test_nothing_after_the_declared_body_reaches_the_origin() -> None:
    async def go() -> None:
        origin = Origin()
        await origin.start()
        try:
            async with proxy({"net.fetch": [f"http://127.0.0.1:{origin.port}/public/**"]}) as p:
                host = f"Host: 127.0.0.1:{origin.port}\r\n"
                smuggled = f"GET /private HTTP/1.1\r\n{host}\r\n"
                raw = (f"POST http://127.0.0.1:{origin.port}/public/a HTTP/1.1\r\n{host}Content-Length: 5\r\n\r\n"
                       f"hello{smuggled}").encode()
                out = await p.request(raw)
                assert out.startswith(b"HTTP/1.1 200")
                assert origin.received[0].endswith(b"\r\n\r\nhello") and b"/private" not in origin.received[0]
                chunked = (f"POST http://127.0.0.1:{origin.port}/public/b HTTP/1.1\r\n{host}"
                           f"Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n"
                           f"{smuggled}").encode()
                out = await p.request(chunked)
                assert out.startswith(b"HTTP/1.1 200")
                body = origin.received[1].split(b"\r\n\r\n", 1)[1]
                assert body == b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n", body  # framed afresh
                assert origin.connections == 2
        finally:
            origin.close()
    run(go())


def test_an_origin_that_closes_without_answering_gives_502() -> None:
    async def go() -> None:
        origin = Origin(response=b"")
        await origin.start()
        try:
            async with proxy({"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}) as p:
                out = await p.request(f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode())
                assert out.startswith(b"HTTP/1.1 502") and b"without a response" in out
        finally:
            origin.close()
    run(go())


def test_an_unresolvable_name_gives_502_naming_it() -> None:
    async def go() -> None:
        async with proxy({"net.fetch": ["http://nowhere.test/**"]}) as p:
            out = await p.request(b"GET http://nowhere.test/ HTTP/1.1\r\nHost: nowhere.test\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 502") and b"cannot resolve nowhere.test" in out
    run(go())


def test_closing_the_job_cuts_tunnels_and_half_sent_heads() -> None:
    async def go() -> None:
        origin = Origin(response=b"")
        await origin.start()
        try:
            async with proxy({"net.fetch": [f"https://127.0.0.1:{origin.port}/**"]}) as p:
                r1, w1 = await asyncio.open_connection("127.0.0.1", p.listener.port)
                w1.write(f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n\r\n"
                         .encode())
                assert (await r1.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                w1.write(b"tunnel bytes\r\n\r\n")
                r2, w2 = await asyncio.open_connection("127.0.0.1", p.listener.port)
                w2.write(b"GET http://127.0.0.1/ HTT")
                await asyncio.sleep(0.2)
                p.job.close()
                p.listener.job = None
                async with asyncio.timeout(2):
                    assert await r1.read() == b"" and await r2.read() == b""
                assert p.metric("net.bytes_out") >= len("tunnel bytes")
                r3, w3 = await asyncio.open_connection("127.0.0.1", p.listener.port)  # no job: closed at once
                async with asyncio.timeout(2):
                    assert await r3.read() == b""
                for w in (w1, w2, w3):
                    w.close()
        finally:
            origin.close()
    run(go())


def test_a_slow_head_gets_408() -> None:
    async def go() -> None:
        async with proxy({"net.fetch": ["http://h/**"]}, header_timeout=0.3) as p:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.listener.port)
            writer.write(b"GET http://h/ HTTP/1.1\r\n")
            async with asyncio.timeout(3):
                out = await reader.read()
            assert out.startswith(b"HTTP/1.1 408") and b"0.3 s" in out
            writer.close()
    run(go())


def test_connections_over_the_cap_get_429(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(egress, "_caps", egress.ConnectionCaps(nofile=0, total=100, per_job=2))

    async def go() -> None:
        async with proxy({"net.fetch": ["http://h/**"]}, header_timeout=5) as p:
            held = [await asyncio.open_connection("127.0.0.1", p.listener.port) for _ in range(2)]
            await asyncio.sleep(0.1)
            out = await p.request(b"")
            assert out.startswith(b"HTTP/1.1 429") and b"more than 2 open connections" in out, out
            assert sum("429" in w for w in p.warns()) == 1
            for _, w in held:
                w.close()
    run(go())


def test_the_caps_follow_the_descriptor_limit() -> None:
    caps = egress.ConnectionCaps.for_limit
    assert (caps(1024).total, caps(1024).per_job) == (85, 10)
    assert (caps(1 << 20).total, caps(1 << 20).per_job) == (87381, 128)
    assert (caps(64).total, caps(64).per_job) == (5, 1)
    for limit in (64, 256, 1024, 4096, 65536, 1 << 20):  # the proxy at its cap holds at most half the limit
        c = caps(limit)
        assert c.total * egress.FDS_PER_CONNECTION <= limit // 2 and 1 <= c.per_job <= min(128, c.total)


def test_the_global_cap_holds_across_jobs_and_frees_up(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = egress.ConnectionCaps(nofile=0, total=3, per_job=2)
    monkeypatch.setattr(egress, "_caps", caps)

    async def go() -> None:
        async with proxy({"net.fetch": ["http://h/**"]}) as a, proxy({"net.fetch": ["http://h/**"]}) as b:
            held = [await asyncio.open_connection("127.0.0.1", a.listener.port) for _ in range(2)]
            held.append(await asyncio.open_connection("127.0.0.1", b.listener.port))
            await asyncio.sleep(0.1)
            assert caps.open == 3
            out = await b.request(b"")  # b holds one, under its own cap: the total is full
            assert out.startswith(b"HTTP/1.1 429") and b"all 3 connections" in out, out
            assert b.warns() == ["egress: refused (429): all 3 connections of the supervisor's egress proxy are "
                                 "in use"] and not a.warns()
            for _, w in held:
                w.close()
            await until(lambda: caps.open == 0)  # the proxy notices the closes and frees the slots
            out = await b.request(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 502") and b"cannot resolve h" in out  # served again
            await until(lambda: caps.open == 0)
    run(go())


def test_closing_a_job_before_its_connections_are_served_frees_their_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    caps = egress.ConnectionCaps(nofile=0, total=10, per_job=10)
    monkeypatch.setattr(egress, "_caps", caps)

    async def go() -> None:
        async with proxy({"net.fetch": ["http://h/**"]}) as p:
            held = [await asyncio.open_connection("127.0.0.1", p.listener.port) for _ in range(3)]
            await until(lambda: caps.open == 3)
            p.job.close()
            await until(lambda: caps.open == 0 and not p.job.exchanges)
            for _, w in held:
                w.close()
    run(go())


# -- what reaches the origin: one meaning, written afresh -------------------------------------
@pytest.mark.parametrize("path", ["/public/..;/private", "/public/..\\private", "/public/..%5cprivate",
                                  "/public/%252e%252e/private", "/public/..%2fprivate"])
def test_an_ambiguous_path_is_refused_before_any_connection(path: str) -> None:
    async def go() -> None:
        origin = Origin()
        await origin.start()
        try:
            async with proxy({"net.fetch": [f"http://127.0.0.1:{origin.port}/public/**"]}) as p:
                out = await p.request(f"GET http://127.0.0.1:{origin.port}{path} HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode())
                assert out.startswith(b"HTTP/1.1 400") and b"ambiguous path" in out, out
                assert origin.connections == 0
                assert p.warns() and "ambiguous path" in p.warns()[0]
        finally:
            origin.close()
    run(go())


def test_a_chunk_size_that_is_not_hex_ends_the_request() -> None:
    async def go() -> None:
        origin = Origin()
        await origin.start()
        try:
            async with proxy({"net.fetch": [f"http://127.0.0.1:{origin.port}/public/**"]}) as p:
                host = f"Host: 127.0.0.1:{origin.port}\r\n"
                # int("0x2e", 16) == 46: a lenient reader takes the next 46 bytes as the chunk's data;
                # one that reads the size as 0 (the last chunk) sees them as a request for /private
                inner = "GET /private HTTP/1.1\r\nHost: h\r\nX: "
                inner += "y" * (0x2e - len(inner) - 4) + "\r\n\r\n"
                assert len(inner) == 0x2e
                raw = (f"POST http://127.0.0.1:{origin.port}/public/a HTTP/1.1\r\n{host}"
                       f"Transfer-Encoding: chunked\r\n\r\n0x2e\r\n{inner}\r\n0\r\n\r\n").encode()
                out = await p.request(raw)
                await until(lambda: len(origin.received) == origin.connections)
                assert out.startswith(b"HTTP/1.1 400") and b"chunk" in out, out
                assert all(b"/private" not in r for r in origin.received), origin.received
                assert all(not r.endswith(b"0\r\n\r\n") for r in origin.received)  # never a complete body
        finally:
            origin.close()
    run(go())


def test_the_origin_gets_the_canonical_request_line_and_fields_written_afresh() -> None:
    async def go() -> None:
        origin = Origin()
        await origin.start()
        try:
            async with proxy({"net.fetch": [f"http://127.0.0.1:{origin.port}/public/**"]}) as p:
                out = await p.request(f"GET http://127.0.0.1:{origin.port}/public/./a/../b/%7e%2E%41?x=%2f HTTP/1.0\r\n"
                                      f"Host: 127.0.0.1:{origin.port}\r\nX-A:   v  \r\n\r\n".encode())
                assert out.startswith(b"HTTP/1.1 200")
                head = origin.received[0].decode()
                assert head == (f"GET /public/b/~.A?x=%2f HTTP/1.0\r\nHost: 127.0.0.1:{origin.port}\r\n"
                                "X-A: v\r\nConnection: close\r\n\r\n"), head
        finally:
            origin.close()
    run(go())


def test_many_short_connections_are_reported_as_a_few_metric_pairs_with_every_byte() -> None:
    """Bytes are reported at most METRIC_INTERVAL after they moved, not once per connection
    (a pair of events per small GET cost as much as the GET), and nothing is lost: the job's
    close reports what is left."""
    async def go() -> None:
        origin = Origin()
        await origin.start()
        try:
            n = 20
            async with proxy({"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}) as p:
                for _ in range(n):
                    out = await p.request(f"GET http://127.0.0.1:{origin.port}/x HTTP/1.1\r\n"
                                          f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode())
                    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
                during = sum(1 for k, b in p.events if k == "metric" and b["name"] == "net.bytes_in")
                assert during < n, during  # (one per connection before)
            assert p.metric("net.bytes_in") == n * len(origin.response)
            assert p.metric("net.bytes_out") == sum(len(r) for r in origin.received)
        finally:
            origin.close()
    run(go())
