"""Who owns the egress proxy's tasks: a job's connections live in its task group and no longer.

Every wait here is bounded (anyio.fail_after, asyncio.timeout, `until`); nothing
sleeps to wait for the proxy. The origins that stall are threads, so that what
is left in `asyncio.all_tasks()` after a job's egress is closed is the proxy's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import anyio
import pytest

from supervisor.egress import caps as egress_caps
from supervisor.egress.exchange import LOOP_COPY
from tests.unit.test_egress_proxy import FakeResolver, Origin, Proxy, proxy, run, until


class StallingOrigin:
    """An origin in a thread: it answers a response head and the first `sent` bytes of a body
    ten times longer, then sends nothing more; `closed` is set when the proxy hangs up."""

    def __init__(self, sent: int) -> None:
        self.sent = sent
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                buf = b""
                while b"\r\n\r\n" not in buf and (data := conn.recv(65536)):
                    buf += data
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (self.sent * 10) + b"x" * self.sent)
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        self.closed.set()

    def close(self) -> None:
        self.sock.close()


def _new_tasks(before: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    return asyncio.all_tasks() - before


def _exchanges(tasks: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    return [t for t in tasks if t.get_name().startswith("egress exchange ")]


@pytest.mark.parametrize("how", ["job-closed", "owner-cancelled"])
@pytest.mark.parametrize("sent", [1000, 1 << 20], ids=["copied-on-the-loop", "spliced-by-a-relay"])
def test_closing_in_the_middle_of_a_slow_response_cancels_the_exchange_and_leaves_nothing_running(
        monkeypatch: pytest.MonkeyPatch, sent: int, how: str) -> None:
    caps = egress_caps.ConnectionCaps(nofile=0, total=10, per_job=10)
    monkeypatch.setattr(egress_caps, "_caps", caps)

    async def go() -> None:
        origin = StallingOrigin(sent)
        before = asyncio.all_tasks()
        p = Proxy({"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}, FakeResolver({}))
        await p.listener.start()
        try:
            with anyio.fail_after(10):  # close() must end run() and every exchange: else this fails
                async with anyio.create_task_group() as tg:
                    tg.start_soon(p.job.run)
                    reader, writer = await asyncio.open_connection("127.0.0.1", p.listener.port)
                    writer.write(f"GET http://127.0.0.1:{origin.port}/slow HTTP/1.1\r\n"
                                 f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode())
                    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                    assert len(await reader.readexactly(sent)) == sent  # the rest never comes
                    (ex,) = p.job.exchanges
                    assert len(_exchanges(_new_tasks(before))) == 1
                    relays = list(ex.relays)
                    assert len(relays) == (1 if sent > LOOP_COPY else 0)
                    if how == "job-closed":
                        p.job.close()
                    else:
                        tg.cancel_scope.cancel()
                # run() has returned: by then every exchange has ended, its descriptors closed
                assert _new_tasks(before) == set(), _new_tasks(before)
                assert p.job.closed and not p.job.exchanges and caps.open == 0
                async with asyncio.timeout(2):
                    assert await reader.read() == b""  # the job's end of it is cut
            for relay in relays:
                assert relay.finished.is_set()
                await anyio.to_thread.run_sync(relay._thread.join, 2)
                assert not relay._thread.is_alive()
            assert await anyio.to_thread.run_sync(origin.closed.wait, 5), "the origin's connection is still open"
            assert p.metric("net.bytes_in") >= sent
            writer.close()
        finally:
            p.listener.close()
            origin.close()
    run(go())


def test_the_header_timeout_is_one_deadline_for_the_whole_head() -> None:
    """A head that trickles in, a byte every 20 ms (well within any per-read timeout), is cut
    at the deadline with 408, and its task ends."""
    async def go() -> None:
        before = asyncio.all_tasks()
        async with proxy({"net.fetch": ["http://h/**"]}, header_timeout=0.5) as p:
            t0 = time.monotonic()  # before the proxy accepts: its deadline starts later
            reader, writer = await asyncio.open_connection("127.0.0.1", p.listener.port)
            head = b"GET http://h/ HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"y" * 300  # 6 s at this pace

            async def trickle() -> None:
                for i in range(len(head)):
                    writer.write(head[i:i + 1])
                    await asyncio.sleep(0.02)  # the client's pace, not a wait for the proxy

            async with anyio.create_task_group() as tg:
                tg.start_soon(trickle)
                async with asyncio.timeout(3):
                    out = await reader.read()
                tg.cancel_scope.cancel()
            elapsed = time.monotonic() - t0
            assert out.startswith(b"HTTP/1.1 408") and b"within 0.5 s" in out, out
            assert 0.5 <= elapsed < 3, elapsed
            assert p.warns() == ["egress: bad request from the job: request head not received within 0.5 s"]
            await until(lambda: not p.job.exchanges)
            writer.close()
            assert not _exchanges(_new_tasks(before))
        assert _new_tasks(before) == set()
    run(go())


class FaultyResolver(FakeResolver):
    async def __call__(self, host: str, port: int) -> list[Any]:
        if host == "bug.test":
            raise RuntimeError("a bug in the resolver")
        return await super().__call__(host, port)


def test_an_exception_in_one_exchange_ends_that_connection_only(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        origin = Origin()
        await origin.start()
        try:
            lease = {"net.fetch": ["http://bug.test/**", f"http://127.0.0.1:{origin.port}/**"]}
            async with proxy(lease) as p:
                p.job.resolver = FaultyResolver({})
                r1, w1 = await asyncio.open_connection("127.0.0.1", p.listener.port)  # served meanwhile
                w1.write(f"GET http://127.0.0.1:{origin.port}/first HTTP/1.1\r\n".encode())
                await until(lambda: len(p.job.exchanges) == 1)
                with caplog.at_level(logging.ERROR, logger="arcp.egress"):
                    out = await p.request(b"GET http://bug.test/ HTTP/1.1\r\nHost: bug.test\r\n\r\n")
                assert out == b""  # that connection ends, unanswered
                assert "egress connection failed" in caplog.text and "a bug in the resolver" in caplog.text
                out = await p.request(f"GET http://127.0.0.1:{origin.port}/next HTTP/1.1\r\n"
                                      f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode())
                assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"ok"), out  # the listener goes on
                w1.write(f"Host: 127.0.0.1:{origin.port}\r\n\r\n".encode())  # and so does the other exchange
                async with asyncio.timeout(5):
                    out = await r1.read()
                assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"ok"), out
                assert not p.job.closed
                await until(lambda: not p.job.exchanges and egress_caps.connection_caps().open == 0)
                w1.close()
        finally:
            origin.close()
    run(go())


def test_connections_handed_over_before_run_starts_wait_for_it_or_are_freed_at_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    caps = egress_caps.ConnectionCaps(nofile=0, total=10, per_job=10)
    monkeypatch.setattr(egress_caps, "_caps", caps)

    async def go() -> None:
        p = Proxy({"net.fetch": ["http://h/**"]}, FakeResolver({}))
        await p.listener.start()
        try:
            answers: list[bytes] = []

            async def client() -> None:
                answers.append(await p.request(b"GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(client)
                await until(lambda: caps.open == 1)  # handed over, waiting for run()
                tg.start_soon(p.job.run)
                await until(lambda: bool(answers), timeout=5)
                p.job.close()
            assert answers[0].startswith(b"HTTP/1.1 502") and b"cannot resolve h" in answers[0], answers
            assert caps.open == 0

            q = Proxy({"net.fetch": ["http://h/**"]}, FakeResolver({}))  # a job whose run() never starts
            await q.listener.start()
            held = [await asyncio.open_connection("127.0.0.1", q.listener.port) for _ in range(2)]
            await until(lambda: caps.open == 2)
            q.listener.close()
            assert caps.open == 0 and not q.job.exchanges
            for r, w in held:
                async with asyncio.timeout(2):
                    assert await r.read() == b""
                w.close()
        finally:
            p.listener.close()
    run(go())
