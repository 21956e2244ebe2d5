"""net.fetch through the egress proxy, against a real server and local listeners only.

Every listener here is started by the test on 127.0.0.1; no request may go
anywhere else, even by mistake, so no name but `localhost` is ever resolved
by the supervisor.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared.landlock import landlock_abi
from tests.conftest import Server
from tests.interop.client import sdk_session

pytestmark = pytest.mark.skipif(landlock_abi() < 4, reason="the egress proxy needs Landlock ABI 4 (TCP rules)")


class Origin:
    """A local HTTP server that records what reached it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _record(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                origin.requests.append((self.command, self.path, dict(self.headers), body))
                return body

            def do_GET(self) -> None:
                self._record()
                if self.path.startswith("/big/"):
                    n = int(self.path.rsplit("/", 1)[1])
                    self.send_response(200)
                    self.send_header("Content-Length", str(n))
                    self.end_headers()
                    block = b"x" * 65536
                    while n > 0:
                        self.wfile.write(block[:n])
                        n -= len(block)
                    return
                payload = f"hello from {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                body = self._record()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Echo:
    """A raw TCP listener on 127.0.0.1 that echoes, and notes when a connection ends."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.closed_at: list[float] = []
        self.received = bytearray()
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        with conn:
            try:
                while data := conn.recv(65536):
                    self.received += data
                    conn.sendall(data)
            except OSError:
                pass
        self.closed_at.append(time.monotonic())

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    o = Origin()
    yield o
    o.close()


@pytest.fixture(scope="module")
def net_server() -> Iterator[Server]:
    """Reused workers (so a job's leftovers would outlive it unless the proxy cuts them) and a
    short head timeout (for the slow-loris test)."""
    s = Server("--reuse-workers", "3", "--egress-header-timeout", "1")
    yield s
    s.stop()


async def _run(url: str, agent: str, input: Any, lease: dict[str, Any] | None = None,
               **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(terminal, events, accepted) of one job."""
    async with sdk_session(url) as (client, rec):
        h = await client.submit(agent=agent, input=input, lease_request=lease, **kw)
        term = await rec.terminal(h.job_id, timeout=40)
        events = [f["payload"] for f in rec.frames if f.get("type") == "job.event" and f.get("job_id") == h.job_id]
        accepted = next(f for f in rec.frames if f.get("type") == "job.accepted" and f.get("job_id") == h.job_id)
        return term, events, accepted


def _result(term: dict[str, Any]) -> Any:
    assert term["type"] == "job.result", term
    return term["payload"]["result"]


def _warns(events: list[dict[str, Any]]) -> list[str]:
    return [e["body"]["message"] for e in events if e["kind"] == "log" and e["body"]["level"] == "warn"]


def _metric_sum(events: list[dict[str, Any]], name: str) -> float:
    return sum(e["body"]["value"] for e in events if e["kind"] == "metric" and e["body"]["name"] == name)


def test_urllib_fetches_an_allowed_url_and_bytes_are_counted(server: Server, origin: Origin) -> None:
    lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}
    term, events, accepted = asyncio.run(_run(server.url, "fetch", {"url": f"http://127.0.0.1:{origin.port}/a?b=1"},
                                              lease))
    r = _result(term)
    assert r["ok"] and r["status"] == 200 and r["body"] == "hello from /a?b=1", r
    assert "egress-proxy" in str(accepted["payload"]), accepted
    method, path, headers, _ = origin.requests[-1]
    assert (method, path) == ("GET", "/a?b=1")
    assert headers.get("Connection") == "close" and "Proxy-Connection" not in headers
    assert _metric_sum(events, "net.bytes_in") >= len("hello from /a?b=1") + 20
    assert _metric_sum(events, "net.bytes_out") >= len("GET /a?b=1 HTTP/1.1")


def test_httpx_fetches_an_allowed_url(make_server: type[Server], httpx_python: str, origin: Origin) -> None:
    """An agent's own HTTP client (httpx, from the agent's venv: the supervisor's is not
    importable by jobs) goes through the proxy by the environment's proxy variables."""
    server = make_server("--agent-python", f"httpxfetch={httpx_python}")
    lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/x/**"]}
    term, _, _ = asyncio.run(_run(server.url, "httpxfetch",
                                  {"url": f"http://127.0.0.1:{origin.port}/x/y", "times": 3}, lease))
    r = _result(term)
    assert [x["status"] for x in r] == [200, 200, 200] and r[0]["body"] == "hello from /x/y", r


def test_a_post_body_goes_through_exactly(server: Server, origin: Origin) -> None:
    lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}
    term, _, _ = asyncio.run(_run(server.url, "fetch", {"url": f"http://127.0.0.1:{origin.port}/post",
                                                         "data": "payload-123"}, lease))
    assert _result(term)["body"] == "payload-123"
    assert origin.requests[-1][3] == b"payload-123"


def test_a_fetch_outside_the_lease_is_refused_and_the_job_goes_on(server: Server, origin: Origin) -> None:
    other = Origin()
    try:
        lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/public/**"]}
        before = len(origin.requests)
        for url in (f"http://127.0.0.1:{origin.port}/private",
                    f"http://127.0.0.1:{origin.port}/public/%2e%2e/private",
                    f"http://127.0.0.1:{other.port}/public/x"):
            term, events, _ = asyncio.run(_run(server.url, "fetch", {"url": url}, lease))
            r = _result(term)  # the job itself succeeds: it got an HTTP answer
            assert r["status"] == 403, (url, r)
            assert "net.fetch" in r["body"] and f"/public/**" in r["body"] and "refused" in r["body"], r
            warns = _warns(events)
            assert warns and "egress refused" in warns[0] and str(url.split("/")[2]) in warns[0], events
        assert len(origin.requests) == before and not other.requests, "a refused request reached a server"
    finally:
        other.close()


def test_ip_literal_forms_and_localhost_need_a_pattern_naming_them(server: Server, origin: Origin) -> None:
    p = origin.port
    named_literal = {"net.fetch": [f"http://127.0.0.1:{p}/**"]}
    wildcard = {"net.fetch": [f"http://*:{p}/**"]}
    named_localhost = {"net.fetch": [f"http://localhost:{p}/**"]}
    before = len(origin.requests)

    async def go() -> None:
        cases = [(named_literal, f"http://127.1:{p}/"), (named_literal, f"http://[::1]:{p}/"),
                 (named_literal, f"http://2130706433:{p}/"), (named_literal, f"http://localhost:{p}/"),
                 (wildcard, f"http://127.0.0.1:{p}/"), (wildcard, f"http://localhost:{p}/")]
        for lease, url in cases:
            term, events, _ = await _run(server.url, "fetch", {"url": url}, lease)
            assert _result(term)["status"] == 403, (lease, url, term)
            assert _warns(events), events
        assert len(origin.requests) == before
        term, _, _ = await _run(server.url, "fetch", {"url": f"http://localhost:{p}/named"}, named_localhost)
        assert _result(term)["body"] == "hello from /named"
    asyncio.run(go())


def test_connect_tunnels_and_the_host_header_must_agree(server: Server) -> None:
    echo = Echo()
    try:
        lease = {"net.fetch": [f"https://127.0.0.1:{echo.port}/api/**"]}

        async def go() -> None:
            ok = (f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n"
                  "ping through the tunnel")
            term, events, _ = await _run(server.url, "rawproxy", {"send": ok, "until": "tunnel"}, lease)
            answer = _result(term)["answer"]
            assert answer.startswith("HTTP/1.1 200") and answer.endswith("ping through the tunnel"), answer
            bad = f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: elsewhere.test:443\r\n\r\nsmuggled"
            term, events, _ = await _run(server.url, "rawproxy", {"send": bad}, lease)
            answer = _result(term)["answer"]
            assert answer.startswith("HTTP/1.1 403") and "does not agree" in answer, answer
            assert any("Host header" in w for w in _warns(events)), events
            other = f"127.0.0.1:{echo.port + 1 if echo.port < 65535 else 1}"
            wrong_port = f"CONNECT {other} HTTP/1.1\r\nHost: {other}\r\n\r\n"
            term, _, _ = await _run(server.url, "rawproxy", {"send": wrong_port}, lease)
            assert _result(term)["answer"].startswith("HTTP/1.1 403")
        asyncio.run(go())
        assert b"smuggled" not in echo.received
    finally:
        echo.close()


def test_no_way_around_the_proxy(server: Server, origin: Origin) -> None:
    lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}

    async def go() -> None:
        term, _, _ = await _run(server.url, "netescape", {"port": origin.port}, lease)
        first = _result(term)
        other_port = int(first["proxy"].rsplit(":", 1)[1])
        term, _, _ = await _run(server.url, "netescape", {"port": origin.port, "other_proxy_port": other_port},
                                {"net.fetch": [f"http://127.0.0.1:{origin.port}/other/**"]})
        r = _result(term)
        assert r["proxy"] and r["proxy"] != first["proxy"], r
        for key in ("tcp", "tcp6", "udp", "bind", "other_proxy", "fastopen"):
            assert r[key] != "ok" and ("Permission denied" in r[key] or "unreachable" in r[key]), (key, r)
        for key in ("dns_localhost", "dns_name"):
            assert r[key] != "ok", (key, r)
        term, _, _ = await _run(server.url, "netescape", {"port": origin.port})  # no net.fetch: no proxy either
        assert _result(term)["proxy"] == ""
    asyncio.run(go())


def test_malformed_and_oversized_requests_get_clear_errors(server: Server, origin: Origin) -> None:
    lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}
    cases = [
        ({"send": "GARBAGE\r\n\r\n"}, "400"),
        ({"send": "GET /relative HTTP/1.1\r\nHost: x\r\n\r\n"}, "400"),
        ({"send": "GET http://127.0.0.1/ HTTP/2.0\r\n\r\n"}, "505"),
        ({"send": "GET http://127.0.0.1:1/" + "a" * 10000 + " HTTP/1.1\r\n\r\n"}, "414"),
        ({"send": f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n" + "X-Pad: " + "b" * 70000 + "\r\n\r\n"},
         "431"),
        ({"send": f"POST http://127.0.0.1:{origin.port}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin.port}\r\n"
                  "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc"}, "400"),
        ({"send": f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n\r\n"}, "400"),  # no Host
    ]

    async def go() -> None:
        for inp, status in cases:
            term, events, _ = await _run(server.url, "rawproxy", inp, lease)
            answer = _result(term)["answer"]
            assert answer.startswith(f"HTTP/1.1 {status}"), (inp["send"][:80], answer[:200])
            assert "egress proxy" in answer and _warns(events), answer
        term, _, _ = await _run(server.url, "fetch", {"url": f"http://127.0.0.1:{origin.port}/after"}, lease)
        assert _result(term)["status"] == 200
    asyncio.run(go())


def test_a_slow_loris_client_is_cut_off(net_server: Server, origin: Origin) -> None:
    lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}
    t0 = time.monotonic()
    term, events, _ = asyncio.run(_run(net_server.url, "rawproxy",
                                       {"send": f"GET http://127.0.0.1:{origin.port}/ HTTP/1.1\r\n",
                                        "slow": 0.25, "slow_bytes": 40}, lease))
    answer = _result(term)["answer"]
    assert answer.startswith("HTTP/1.1 408") and "1 s" in answer, answer
    assert time.monotonic() - t0 < 20


def test_a_connection_left_open_is_closed_at_the_terminal(net_server: Server) -> None:
    echo = Echo()
    try:
        lease = {"net.fetch": [f"https://127.0.0.1:{echo.port}/**"]}
        send = f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n"
        term, _, _ = asyncio.run(_run(net_server.url, "rawproxy", {"send": send, "hold": True,
                                                                   "then_send": "still here"}, lease))
        done = time.monotonic()
        assert _result(term)["answer"].startswith("HTTP/1.1 200")
        deadline = time.monotonic() + 5
        while not echo.closed_at and time.monotonic() < deadline:
            time.sleep(0.02)
        assert echo.closed_at, "the tunnel outlived its job"
        assert echo.closed_at[0] - done < 1.0
    finally:
        echo.close()


def test_ambiguous_paths_and_non_hex_chunk_sizes_never_reach_the_origin(server: Server) -> None:
    """A raw origin (the echo listener: it records every byte) is what a lenient server would
    parse; nothing it receives may hold a path outside the lease."""
    echo = Echo()
    try:
        p = echo.port
        lease = {"net.fetch": [f"http://127.0.0.1:{p}/public/**"]}
        host = f"Host: 127.0.0.1:{p}\r\n"
        inner = "GET /private HTTP/1.1\r\nHost: h\r\nX: "
        inner += "y" * (0x2e - len(inner) - 4) + "\r\n\r\n"  # 0x2e bytes: a lenient reader's chunk
        cases = [(f"GET http://127.0.0.1:{p}{path} HTTP/1.1\r\n{host}\r\n", "ambiguous path")
                 for path in ("/public/..;/private", "/public/..\\private", "/public/..%5cprivate",
                              "/public/%252e%252e/private", "/public/..%2fprivate")]
        cases.append((f"POST http://127.0.0.1:{p}/public/a HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n"
                      f"0x2e\r\n{inner}\r\n0\r\n\r\n", "chunk"))

        async def go() -> None:
            for send, reason in cases:
                term, events, _ = await _run(server.url, "rawproxy", {"send": send}, lease)
                answer = _result(term)["answer"]
                assert answer.startswith("HTTP/1.1 400") and reason in answer, (send[:60], answer[:300])
                assert any(reason in w for w in _warns(events)), events
        asyncio.run(go())
        time.sleep(0.2)
        assert b"/private" not in echo.received and b"0\r\n\r\n" not in echo.received, bytes(echo.received)
    finally:
        echo.close()


class Hold:
    """A listener on 127.0.0.1 that keeps every connection open until `release()`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)

    def release(self) -> None:
        for c in list(self.conns):
            c.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.release()
        self.sock.close()


NOFILE = 512  # the low-limit server's RLIMIT_NOFILE
TOTAL, PER_JOB = 512 // 12, min(128, 512 // 12 // 8)  # its proxy's caps (egress.ConnectionCaps): 42 and 5


def test_the_proxy_caps_connections_before_the_supervisor_runs_out_of_descriptors(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any, origin: Origin) -> None:
    import resource

    import tests.conftest

    real = tests.conftest.EXE
    wrapper = tmp_path / "arcp-supervisor-low-nofile"
    wrapper.write_text(f"#!{sys.executable}\nimport os, resource, sys\n"
                       f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}))\n"
                       f"os.execv({str(real)!r}, [{str(real)!r}] + sys.argv[1:])\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(tests.conftest, "EXE", wrapper)
    jobs, per_job = 9, PER_JOB + 1  # 9 * 5 > 42: the total runs out, and each job asks past its own cap
    hold = Hold()
    srv = Server("--agent", "holdconns=tests.egress_agents:hold_connections")
    try:
        with open(f"/proc/{srv.pid}/limits") as f:
            assert any(line.startswith("Max open files") and f"{NOFILE}" in line for line in f)
        lease = {"net.fetch": [f"https://127.0.0.1:{hold.port}/**", f"http://127.0.0.1:{origin.port}/**"]}

        async def go() -> tuple[list[dict[str, Any]], list[list[str]], int]:
            async with sdk_session(srv.url) as (client, rec):
                handles = [await client.submit(agent="holdconns", lease_request=lease,
                                               input={"port": hold.port, "n": per_job, "hold": 60})
                           for _ in range(jobs)]
                ids = {h.job_id for h in handles}

                def holding() -> int:
                    return sum(1 for f in rec.frames if f.get("type") == "job.event" and f.get("job_id") in ids
                               and f["payload"]["kind"] == "log"
                               and f["payload"]["body"]["message"].startswith("holding"))
                deadline = time.monotonic() + 90
                while holding() < jobs and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert holding() == jobs, "not every job got its answers"
                fds = len(os.listdir(f"/proc/{srv.pid}/fd"))  # at the peak: every slot taken
                hold.release()
                results, warns = [], []
                for h in handles:
                    results.append(_result(await rec.terminal(h.job_id, timeout=60)))
                    warns.append(_warns([f["payload"] for f in rec.frames
                                         if f.get("type") == "job.event" and f.get("job_id") == h.job_id]))
                return results, warns, fds

        results, warns, fds = asyncio.run(go())
        opened = [r["statuses"].count(200) for r in results]
        assert sum(opened) == TOTAL and max(opened) == PER_JOB, results
        assert all(s in (200, 429) for r in results for s in r["statuses"]), results
        refusals = [text for r in results for text in r["refusals"]]
        assert sum(f"all {TOTAL} connections" in t for t in refusals) == jobs * per_job - TOTAL - \
            sum(f"more than {PER_JOB} open connections" in t for t in refusals)
        assert any(f"all {TOTAL} connections" in t for t in refusals), refusals
        assert any(f"more than {PER_JOB} open connections" in t for t in refusals), refusals
        for r, w in zip(results, warns, strict=True):
            if r["refusals"]:
                assert any("429" in x for x in w), (r, w)
        assert fds < NOFILE - 100, fds

        async def after() -> None:  # a new session and job are served as before
            term, _, _ = await _run(srv.url, "fetch", {"url": f"http://127.0.0.1:{origin.port}/after-cap"}, lease)
            assert _result(term)["body"] == "hello from /after-cap"
        asyncio.run(after())
        assert not any("Too many open files" in line for line in srv.stderr_lines), srv.stderr_lines[-20:]
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] > NOFILE  # this process was not limited
    finally:
        srv.stop()
        hold.close()
