"""The shell client (`arcp-supervisor submit | jobs | watch | cancel | top`) as a user runs
it: a real server, the command as a process of its own, its stdout, stderr and exit status;
once under a pseudo-terminal, reading the screen."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import start_blocking_portal
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.conftest import EXE, ROOT, Server
from tests.interop.client import listed, poll, sdk_session
from tests.shell_agents import REGISTRY as SHELL_AGENTS

JOB_ID = re.compile(r"\bjob_[0-9A-HJKMNP-TV-Z]{26}\b")
# Off a terminal nothing but text: no escape, no carriage return, no other C0/C1 control.
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
USAGE = "x-vendor.arcp-supervisor.usage"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def _flags() -> list[str]:
    out = []
    for a in SHELL_AGENTS:
        out += ["--agent", a]
    return out


@pytest.fixture(scope="module")
def srv() -> Iterator[Server]:
    s = Server(*_flags())
    yield s
    s.stop()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARCP_") and k not in ("FORCE_COLOR",)}
    env.update(extra)
    return env


def shell(*args: str, url: str | None = None, stdin: str | bytes | None = None, timeout: float = 60,
          env: dict[str, str] | None = None, text: bool = True) -> subprocess.CompletedProcess[Any]:
    argv = [str(EXE), *args] + (["--url", url] if url else [])
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=text, timeout=timeout,
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          env=env if env is not None else _env())


def _plain(p: subprocess.CompletedProcess[Any]) -> None:
    for name, data in (("stdout", p.stdout), ("stderr", p.stderr)):
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        assert not CONTROL.search(text.replace("\n", "")), f"control characters on {name}: {text!r}"
        assert "Traceback" not in text, text


def _jobs(url: str, token: str = "") -> dict[str, dict[str, Any]]:
    async def go() -> dict[str, dict[str, Any]]:
        async with sdk_session(url, token) as (client, _):
            page = await client.list_jobs(limit=1000)
            return {j.job_id: j.model_dump() for j in page.jobs}
    return asyncio.run(go())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- submit -----------------------------------------------------------------------------
def test_submit_prints_result_on_stdout_and_job_id_and_logs_on_stderr(srv: Server) -> None:
    p = shell("submit", "echo", "--input", '{"a": [1, "\u00e9"]}', url=srv.url)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"echo": {"a": [1, "\u00e9"]}}
    ids = JOB_ID.findall(p.stderr)
    assert ids and ids[0] in _jobs(srv.url), p.stderr
    assert "echoing" in p.stderr  # the agent's log event
    assert not JOB_ID.search(p.stdout)
    _plain(p)


def test_submit_error_exits_1_with_code_and_message_without_control_characters(srv: Server) -> None:
    p = shell("submit", "raises", "--input", json.dumps({"message": "bad \x1b[31mred\x07 thing"}), url=srv.url)
    assert p.returncode == 1, p.stderr
    assert p.stdout == ""
    assert "INTERNAL_ERROR" in p.stderr and "bad " in p.stderr and "red" in p.stderr, p.stderr
    assert "\\x1b" in p.stderr  # the agent's escape shown, not sent to the terminal
    _plain(p)
    p = shell("submit", "denies", url=srv.url)
    assert p.returncode == 1
    assert "PERMISSION_DENIED: agent says no" in p.stderr and '"why":"test"' in p.stderr, p.stderr
    _plain(p)


def test_submit_refused_exits_1(srv: Server) -> None:
    p = shell("submit", "nosuchagent", url=srv.url)
    assert p.returncode == 1 and "AGENT_NOT_AVAILABLE" in p.stderr, p.stderr
    p = shell("submit", "echo", "--limit", "bogus_key=3", url=srv.url)
    assert p.returncode == 1 and "INVALID_REQUEST" in p.stderr and "bogus_key" in p.stderr, p.stderr
    _plain(p)


def test_submit_detach_prints_only_the_job_id(srv: Server) -> None:
    p = shell("submit", "sleep", "--input", '{"seconds": 1}', "--detach", url=srv.url)
    assert p.returncode == 0, p.stderr
    assert re.fullmatch(r"job_[0-9A-HJKMNP-TV-Z]{26}\n", p.stdout), p.stdout
    assert p.stderr == ""
    job_id = p.stdout.strip()
    assert _jobs(srv.url)[job_id]["status"] in ("pending", "running")  # the job outlives the session
    w = shell("watch", job_id, url=srv.url)
    assert w.returncode == 0, w.stderr
    assert json.loads(w.stdout) == {"slept": True}
    assert job_id in w.stderr and "sleeping" in w.stderr  # history, then live
    _plain(w)


def test_submit_json_writes_every_frame_as_one_line(srv: Server) -> None:
    p = shell("submit", "steps", "--input", '{"n": 3, "interval": 0.01}', "--json", "--limit", "memory_mb=200",
              "--max-runtime", "60", url=srv.url)
    assert p.returncode == 0, p.stderr
    frames = [json.loads(line) for line in p.stdout.splitlines()]
    assert frames[0]["type"] == "job.accepted" and frames[-1]["type"] == "job.result"
    assert len({f["job_id"] for f in frames}) == 1
    assert [f["payload"]["body"]["current"] for f in frames if f["type"] == "job.event"
            and f["payload"]["kind"] == "progress"] == [1, 2, 3]
    assert frames[-1]["payload"]["result"] == {"steps": 3}
    limits = frames[0]["payload"]["x-vendor.arcp-supervisor.limits"]
    assert limits["memory_mb"] == 200
    assert frames[0]["payload"]["lease"]["x-vendor.arcp-supervisor.limits"] == ["memory_mb:200"]
    _plain(p)
    e = shell("submit", "raises", "--json", url=srv.url)
    assert e.returncode == 1
    assert json.loads(e.stdout.splitlines()[-1])["type"] == "job.error"
    assert "INTERNAL_ERROR" in e.stderr


def test_submit_max_runtime(srv: Server) -> None:
    p = shell("submit", "sleep", "--input", '{"seconds": 20}', "--max-runtime", "1", url=srv.url)
    assert p.returncode == 1 and "TIMEOUT" in p.stderr, p.stderr


def test_submit_input_from_a_file_and_from_stdin(srv: Server, tmp_path: Path) -> None:
    f = tmp_path / "in.json"
    f.write_text('{"from": "file"}')
    p = shell("submit", "echo", "--input", f"@{f}", url=srv.url)
    assert p.returncode == 0 and json.loads(p.stdout) == {"echo": {"from": "file"}}, p.stderr
    p = shell("submit", "echo", "--input", "-", stdin='{"from": "stdin"}', url=srv.url)
    assert p.returncode == 0 and json.loads(p.stdout) == {"echo": {"from": "stdin"}}, p.stderr


def test_submit_streamed_result_bytes_as_they_are(srv: Server) -> None:
    p = shell("submit", "stream", "--input", '{"size": 70000}', url=srv.url, text=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout == (bytes(range(256)) * 274)[:70000]


def test_bad_usage_exits_2(srv: Server, tmp_path: Path) -> None:
    cases = [
        ["submit"],
        ["submit", "echo", "--input", "{not json"],
        ["submit", "echo", "--input", f"@{tmp_path / 'missing.json'}"],
        ["submit", "echo", "--input", "-"],  # stdin is empty: not JSON
        ["submit", "echo", "--lease", '["fs.read"]'],
        ["submit", "echo", "--limit", "memory_mb"],
        ["submit", "echo", "--limit", "memory_mb=lots"],
        ["submit", "echo", "--max-runtime", "0"],
        ["submit", "not an agent"],
        ["submit", "echo", "--no-such-flag"],
        ["watch"],
        ["cancel"],
        ["jobs", "--json=3"],
    ]
    for args in cases:
        p = shell(*args, url=srv.url)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
        assert p.stdout == "", (args, p.stdout)
        assert "Traceback" not in p.stderr


def test_unreachable_server_exits_3() -> None:
    url = f"ws://127.0.0.1:{_free_port()}/arcp"
    for args in (["submit", "echo"], ["jobs"], ["watch", "job_x"], ["cancel", "job_x"], ["top"]):
        p = shell(*args, url=url)
        assert p.returncode == 3, (args, p.stderr)
        assert "cannot connect" in p.stderr and url in p.stderr
        _plain(p)
    p = shell("jobs", env=_env(ARCP_URL=url))  # the URL from the environment
    assert p.returncode == 3 and url in p.stderr


def test_bad_token_exits_3(make_server: type[Server]) -> None:
    s = make_server("--token", "s3cret=alice")
    p = shell("submit", "echo", "--token", "wrong", url=s.url)
    assert p.returncode == 3 and "UNAUTHENTICATED" in p.stderr, p.stderr
    assert shell("jobs", url=s.url).returncode == 3  # no token at all
    p = shell("submit", "echo", "--token", "s3cret", url=s.url)
    assert p.returncode == 0, p.stderr
    p = shell("jobs", "--json", env=_env(ARCP_TOKEN="s3cret", ARCP_URL=s.url))
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 1, p.stderr


def _read_until(stream: Any, pattern: str, timeout: float) -> str:
    """Lines of `stream` (a pipe) up to one containing `pattern`, read by a thread."""
    seen: list[str] = []
    found = threading.Event()

    def read() -> None:
        for raw in stream:
            seen.append(raw.decode(errors="replace"))
            if pattern in seen[-1]:
                found.set()
                return

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(timeout), "".join(seen)
    return "".join(seen)


def test_ctrl_c_cancels_the_job_and_exits_130(srv: Server) -> None:
    proc = subprocess.Popen([str(EXE), "submit", "sleep", "--input", '{"seconds": 60}', "--url", srv.url],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env())
    try:
        head = _read_until(proc.stderr, "sleeping", 30)
        job_id = JOB_ID.findall(head)[0]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
        assert proc.stdout is not None and proc.stdout.read() == b""
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert _jobs(srv.url)[job_id]["status"] == "cancelled"


@contextlib.contextmanager
def _relay(url: str, drop: str) -> Iterator[str]:
    """A WebSocket relay to `url` (the URL it listens on) that forwards every frame both
    ways but the client's frames of type `drop`."""
    port = _free_port()

    async def handler(conn: ServerConnection) -> None:
        async with connect(url, max_size=None) as up, anyio.create_task_group() as tg:
            async def pump(src: Any, dst: Any, filtered: bool) -> None:
                try:
                    async for msg in src:
                        if not (filtered and json.loads(msg).get("type") == drop):
                            await dst.send(msg)
                except ConnectionClosed:
                    pass  # either side going away ends the relay
                tg.cancel_scope.cancel()
            tg.start_soon(pump, conn, up, True)
            tg.start_soon(pump, up, conn, False)

    async def start() -> Any:
        return await serve(handler, "127.0.0.1", port, max_size=None)

    with start_blocking_portal() as portal:
        server = portal.call(start)

        async def stop() -> None:
            server.close()
            await server.wait_closed()

        try:
            yield f"ws://127.0.0.1:{port}/arcp"
        finally:
            portal.call(stop)


def test_a_second_ctrl_c_ends_the_wait_for_the_cancel(srv: Server) -> None:
    with _relay(srv.url, drop="job.cancel") as url:  # the cancel never arrives: the job goes on
        proc = subprocess.Popen([str(EXE), "submit", "sleep", "--input", '{"seconds": 30}', "--url", url],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=_env())
        try:
            assert proc.stderr is not None
            head = _read_until(proc.stderr, "sleeping", 30)
            job_id = JOB_ID.findall(head)[0]
            proc.send_signal(signal.SIGINT)
            _read_until(proc.stderr, "cancelling job", 10)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            assert proc.wait(20) == 130
            took = time.monotonic() - started
            rest = proc.stderr.read().decode(errors="replace")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    assert took < 5, took  # well before the cancel's wait (10 s) would have ended
    assert "interrupted" in rest and "Traceback" not in rest, rest
    assert _jobs(srv.url)[job_id]["status"] == "running"


def test_ctrl_c_in_watch_leaves_the_job_running(srv: Server) -> None:
    job_id = shell("submit", "sleep", "--input", '{"seconds": 30}', "--detach", url=srv.url).stdout.strip()
    proc = subprocess.Popen([str(EXE), "watch", job_id, "--url", srv.url], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        _read_until(proc.stderr, "sleeping", 30)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(20) == 130
        took = time.monotonic() - started
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert took < 5, took  # the job is left running, not waited for
    assert _jobs(srv.url)[job_id]["status"] == "running"


# -- jobs, watch, cancel, top --------------------------------------------------------------
def test_jobs_watch_and_cancel(srv: Server) -> None:
    done = shell("submit", "echo", "--input", '{"w": 1}', url=srv.url)
    done_id = JOB_ID.findall(done.stderr)[0]
    running_id = shell("submit", "sleep", "--input", '{"seconds": 30}', "--detach", url=srv.url).stdout.strip()

    p = shell("jobs", url=srv.url)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["JOB", "AGENT", "STATUS", "SUBMITTED"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows[done_id][2] == "success" and rows[running_id][2] == "running"
    _plain(p)

    p = shell("jobs", "--json", "--status", "running", url=srv.url)
    entries = [json.loads(line) for line in p.stdout.splitlines()]
    assert running_id in {e["job_id"] for e in entries} and {e["status"] for e in entries} == {"running"}
    p = shell("jobs", "--json", "--status", "success,error", url=srv.url)
    assert done_id in {json.loads(line)["job_id"] for line in p.stdout.splitlines()}

    w = shell("watch", done_id, url=srv.url)
    assert w.returncode == 0 and json.loads(w.stdout) == {"echo": {"w": 1}} and "echoing" in w.stderr, w.stderr
    w = shell("watch", done_id, "--json", url=srv.url)
    types = [json.loads(line)["type"] for line in w.stdout.splitlines()]
    assert types[0] == "job.subscribed" and types[-1] == "job.result" and "job.event" in types
    w = shell("watch", "job_01ARZ3NDEKTSV4RRFFQ69G5FAV", url=srv.url)
    assert w.returncode == 1 and "JOB_NOT_FOUND" in w.stderr

    c = shell("cancel", "job_01ARZ3NDEKTSV4RRFFQ69G5FAV", url=srv.url)
    assert c.returncode == 1 and "JOB_NOT_FOUND" in c.stderr, c.stderr
    _plain(c)
    # Not an admin: another session's running job is not ours to cancel.
    c = shell("cancel", running_id, url=srv.url)
    assert c.returncode == 1 and "PERMISSION_DENIED" in c.stderr, c.stderr
    assert _jobs(srv.url)[running_id]["status"] == "running"
    c = shell("cancel", done_id, url=srv.url)
    assert c.returncode == 0 and "success" in c.stderr, c.stderr


def test_top_off_a_terminal_prints_one_snapshot(srv: Server) -> None:
    async def go() -> tuple[str, subprocess.CompletedProcess[Any], float, bool]:
        async with sdk_session(srv.url) as (client, rec):
            h = await client.submit(agent="busy", input={})
            await rec.wait_for(lambda f: f.get("type") == "job.event" and f["payload"].get("kind") == "log")

            async def measuring() -> bool | None:  # its usage so far is in the listing top reads
                entry = (await listed(client, h.job_id))[h.job_id]
                return USAGE in (entry.model_extra or {}) or None
            await poll(measuring, "the running job's usage in session.list_jobs")
            started = time.monotonic()
            try:
                p = await asyncio.to_thread(shell, "top", url=srv.url)
                took = time.monotonic() - started
                page = await client.list_jobs(limit=1000)
                measured = any(USAGE in (j.model_extra or {}) for j in page.jobs if j.job_id == h.job_id)
            finally:
                await client.cancel_job(h.job_id)
                await rec.terminal(h.job_id)
                with contextlib.suppress(Exception):
                    await h.done
            return h.job_id, p, took, measured

    job_id, p, took, measured = asyncio.run(go())
    assert took < 15
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith("arcp-supervisor top") and re.search(r"\d+ running, \d+ queued", lines[0])
    assert lines[1].split()[:4] == ["JOB", "AGENT", "STATUS", "TIME"]
    row = next(line for line in lines if line.startswith(job_id))
    assert "running" in row
    if measured:  # the listing carries the job's usage so far: its CPU share is shown
        assert re.search(r" \d+% ", row), row
    _plain(p)


ADMINS = '[auth]\ntokens = { tok-a = "alice", tok-ops = "ops" }\nadmins = ["ops"]\n'


def test_admin_lists_watches_and_cancels_every_principals_jobs(make_server: type[Server], tmp_path: Path) -> None:
    cfg = tmp_path / "admins.toml"
    cfg.write_text(ADMINS)
    s = make_server("--config", str(cfg))
    job_id = shell("submit", "sleep", "--input", '{"seconds": 30}', "--detach", "--token", "tok-a",
                   url=s.url).stdout.strip()
    assert JOB_ID.fullmatch(job_id)

    p = shell("jobs", "--token", "tok-ops", url=s.url)
    assert p.returncode == 0
    assert p.stdout.splitlines()[0].split() == ["JOB", "AGENT", "STATUS", "SUBMITTED", "PRINCIPAL"]
    assert any(line.startswith(job_id) and line.split()[-1] == "alice" for line in p.stdout.splitlines())
    t = shell("top", "--token", "tok-ops", url=s.url)
    assert t.returncode == 0 and "PRINCIPAL" in t.stdout.splitlines()[1]
    assert any(line.startswith(job_id) and "alice" in line for line in t.stdout.splitlines()), t.stdout

    c = shell("cancel", job_id, "--reason", "operator says so", "--token", "tok-ops", url=s.url)
    assert c.returncode == 0 and "cancelled" in c.stderr, c.stderr
    assert _jobs(s.url, "tok-a")[job_id]["status"] == "cancelled"


# -- the progress bar on a terminal ---------------------------------------------------------
def _run_in_pty(argv: list[str], timeout: float) -> tuple[int, str]:
    """`argv` with a pseudo-terminal as stdin, stdout and stderr: its exit status and the
    screen's text as written (escape sequences kept)."""
    master, slave = pty.openpty()
    env = _env(TERM="xterm-256color", COLUMNS="120", LINES="40")
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the other side is closed
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        status = proc.wait(max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)
    return status, out.decode("utf-8", "replace")


def test_progress_bar_under_a_pseudo_terminal(srv: Server) -> None:
    status, screen = _run_in_pty([str(EXE), "submit", "steps", "--input", '{"n": 4, "interval": 0.3}',
                                  "--url", srv.url], timeout=60)
    assert status == 0, screen
    assert ANSI.search(screen), "no terminal rendering at all"
    text = ANSI.sub("", screen)
    for pct in ("25%", "50%", "75%", "100%"):  # the bar as the progress events came
        assert pct in text, text
    assert "4/4 steps" in text and "\u2501" in text  # the bar itself (rich's heavy line)
    assert "step 3" in text  # log lines above it
    result = text[text.rindex("{"):]
    assert json.loads(result.replace("\r", "")) == {"steps": 4}


class _Terminal:
    """A command under a pseudo-terminal (stdin, stdout and stderr), read as it writes."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        env = _env(TERM="xterm-256color", COLUMNS="120", LINES="40")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     start_new_session=True)
        os.close(slave)
        self.screen = bytearray()

    def read_until(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in ANSI.sub("", self.screen.decode("utf-8", "replace")):
            assert time.monotonic() < deadline, self.screen.decode("utf-8", "replace")
            if select.select([self.master], [], [], 0.2)[0]:
                self.screen += os.read(self.master, 65536)

    def wait(self, timeout: float) -> int:
        """The exit status, the screen read to the end."""
        status = self.proc.wait(timeout)
        while select.select([self.master], [], [], 0.2)[0]:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not data:
                break
            self.screen += data
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def test_top_on_a_terminal_quits_on_q_and_on_ctrl_c(srv: Server) -> None:
    for how, expected in (("q", 0), ("ctrl-c", 130)):
        term = _Terminal([str(EXE), "top", "--url", srv.url])
        try:
            term.read_until("q or Ctrl-C to quit", 30)
            echo = termios.tcgetattr(term.master)[3] & termios.ECHO
            assert not echo  # single keys, not echoed
            if how == "q":
                os.write(term.master, b"q")
            else:
                term.proc.send_signal(signal.SIGINT)
            started = time.monotonic()
            assert term.wait(10) == expected, (how, term.screen)
            assert time.monotonic() - started < 5, how
            assert termios.tcgetattr(term.master)[3] & termios.ECHO, how  # the terminal's modes given back
            assert b"Traceback" not in term.screen, term.screen.decode("utf-8", "replace")
        finally:
            term.close()
