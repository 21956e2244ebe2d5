"""Start, stop, reload: a drain on SIGTERM/SIGINT (and on a signal to the whole process
group), SIGHUP re-reading --config, and a stdio session whose input ends."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import arcp
import orjson
import pytest
from arcp import WebSocketTransport
from arcp.client import ARCPClient
from websockets.asyncio.client import connect

from tests.conftest import EXE, ROOT, Server, agent_flags
from tests.interop.client import FEATURES, Recorder, resume_once_detached, sdk_session


def _wait_stderr(srv: Server, text: str, timeout: float = 15.0) -> None:
    srv.wait_stderr(text, timeout)


async def _wait_stderr_async(srv: Server, text: str, timeout: float = 15.0) -> None:
    await srv.wait_stderr_async(text, timeout)


def _exit_status(srv: Server, timeout: float = 20.0) -> int:
    return srv.proc.wait(timeout)


def _stored(state: Path, job_id: str) -> tuple[str, list[str]]:
    """The job's status in the store, and the types of the frames logged for it."""
    with sqlite3.connect(state / "arcp-supervisor.sqlite3") as db:
        (status,) = db.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        frames = [orjson.loads(f)["type"] for (f,) in
                  db.execute("SELECT frame FROM frames WHERE job_id = ? ORDER BY seq", (job_id,))]
    return status, frames


def _running(job_id: str) -> Callable[[dict[str, Any]], bool]:
    """The job's first log line: its agent is running."""
    return lambda f: f.get("type") == "job.event" and f.get("job_id") == job_id and f["payload"]["kind"] == "log"


async def _draining_refusal(url: str) -> arcp.ARCPError:
    with pytest.raises(arcp.ARCPError) as caught:
        async with sdk_session(url):
            pass
    return caught.value


def _assert_draining(err: BaseException) -> None:
    assert isinstance(err, arcp.ARCPError), err
    assert err.code == "INTERNAL_ERROR" and err.retryable is True, err
    assert err.details == {"reason": "draining"}, err


def test_sigterm_drains_a_running_job_then_exits_0(tmp_path: Path, make_server: type[Server]) -> None:
    state = tmp_path / "state"
    srv = make_server("--state-dir", str(state), "--drain-timeout", "20")

    async def go() -> str:
        async with sdk_session(srv.url) as (a, rec_a), sdk_session(srv.url) as (b, _):
            # long enough to be running through the refusals below on a loaded host
            h = await a.submit(agent="sleep", input={"seconds": 5})
            await rec_a.wait_for(_running(h.job_id))
            os.kill(srv.pid, signal.SIGTERM)
            await _wait_stderr_async(srv, "SIGTERM: draining")
            _assert_draining(await _draining_refusal(srv.url))  # a new connection
            with pytest.raises(arcp.ARCPError) as refused:  # a submit on a session opened before
                await asyncio.wait_for(b.submit(agent="echo", input=1), 10)
            _assert_draining(refused.value)
            term = await rec_a.terminal(h.job_id, timeout=15)
            assert term["type"] == "job.result" and term["payload"]["result"] == {"slept": True}
            bye = await rec_a.wait_for(lambda f: f.get("type") == "session.bye", timeout=10)
            assert bye["payload"]["reason"] == "server shutting down"
            assert rec_a.frames.index(term) < rec_a.frames.index(bye)
            return h.job_id

    job_id = asyncio.run(go())
    assert _exit_status(srv) == 0, "".join(srv.stderr_lines[-30:])
    status, frames = _stored(state, job_id)
    assert status == "success" and "job.cancelled" not in frames and frames[-1] == "job.result", (status, frames)


def test_a_second_signal_cancels_at_once_and_the_terminals_still_go_out(
        tmp_path: Path, make_server: type[Server]) -> None:
    state = tmp_path / "state"
    srv = make_server("--state-dir", str(state), "--drain-timeout", "120")

    async def go() -> str:
        async with sdk_session(srv.url) as (a, rec):
            h = await a.submit(agent="sleep", input={"seconds": 120})
            await rec.wait_for(_running(h.job_id))
            os.kill(srv.pid, signal.SIGINT)
            await _wait_stderr_async(srv, "SIGINT: draining")
            started = time.monotonic()
            os.kill(srv.pid, signal.SIGTERM)
            term = await rec.terminal(h.job_id, timeout=15)
            assert time.monotonic() - started < 10
            assert term["type"] == "job.error" and term["payload"]["code"] == "CANCELLED", term
            assert any(f.get("type") == "job.cancelled" and f.get("job_id") == h.job_id for f in rec.frames)
            await rec.wait_for(lambda f: f.get("type") == "session.bye", timeout=10)
            return h.job_id

    job_id = asyncio.run(go())
    assert _exit_status(srv) == 0, "".join(srv.stderr_lines[-30:])
    status, frames = _stored(state, job_id)
    assert status == "cancelled" and frames[-2:] == ["job.cancelled", "job.error"], (status, frames)


def test_sigterm_to_the_whole_process_group_drains_and_keeps_the_fork_server(make_server: type[Server]) -> None:
    srv = make_server("--drain-timeout", "20")

    async def go() -> None:
        async with sdk_session(srv.url) as (a, rec):
            h = await a.submit(agent="sleep", input={"seconds": 2})
            await rec.wait_for(_running(h.job_id))
            os.killpg(srv.pid, signal.SIGTERM)  # what systemd and `timeout` do
            await _wait_stderr_async(srv, "SIGTERM: draining")
            term = await rec.terminal(h.job_id, timeout=15)
            assert term["type"] == "job.result" and term["payload"]["result"] == {"slept": True}, term
            await rec.wait_for(lambda f: f.get("type") == "session.bye", timeout=10)

    asyncio.run(go())
    assert _exit_status(srv) == 0, "".join(srv.stderr_lines[-30:])
    log = "".join(srv.stderr_lines)
    assert "fork server exited" not in log and "starting a new one" not in log, log[-3000:]


def test_a_resume_during_a_drain_is_taken_while_its_jobs_run(make_server: type[Server]) -> None:
    srv = make_server("--drain-timeout", "20")

    async def go() -> None:
        conn = await connect(srv.url)
        rec = Recorder(WebSocketTransport(conn))
        client = ARCPClient(client=arcp.ClientInfo(name="tests", version="1"), token="", features=FEATURES)
        welcome = await client.connect(rec)
        # long enough to be running when the resume comes, on a loaded host too
        h = await client.submit(agent="sleep", input={"seconds": 5})
        await rec.wait_for(_running(h.job_id))
        last = max(f["event_seq"] for f in rec.frames if "event_seq" in f)
        conn.transport.abort()  # a network cut: the session waits to be resumed
        os.kill(srv.pid, signal.SIGTERM)
        await _wait_stderr_async(srv, "SIGTERM: draining")
        _, again, rec2, _ = await resume_once_detached(srv.url, arcp.SessionResume(
            session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=last))
        assert again.session_id == welcome.session_id
        term = await rec2.terminal(h.job_id, timeout=15)
        assert term["type"] == "job.result" and term["payload"]["result"] == {"slept": True}
        await rec2.wait_for(lambda f: f.get("type") == "session.bye", timeout=10)

    asyncio.run(go())
    assert _exit_status(srv) == 0, "".join(srv.stderr_lines[-30:])


def _config(tmp_path: Path, tokens: dict[str, str], agents: dict[str, str], head: str = "") -> Path:
    """A config file: `head` (TOML tables), the tokens, the agents."""
    lines = [head, "[auth.tokens]"] + [f'"{t}" = "{p}"' for t, p in tokens.items()]
    for name, entry in agents.items():
        lines += ["[[agents]]", f'name = "{name}"', f'entry = "{entry}"']
    path = tmp_path / "server.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _agents(client: ARCPClient) -> set[str]:
    welcome = client.welcome
    assert welcome is not None
    return {a if isinstance(a, str) else a.name for a in welcome.capabilities.agents}


def test_sighup_applies_new_tokens_and_agents_to_new_sessions_while_a_job_runs(
        tmp_path: Path, make_server: type[Server]) -> None:
    cfg = _config(tmp_path, {"tok-alice": "alice"}, {"first": "tests.agents:echo"})
    srv = make_server("--config", str(cfg))

    async def go() -> None:
        async with sdk_session(srv.url, token="tok-alice") as (a, rec):
            h = await a.submit(agent="sleep", input={"seconds": 3})
            await rec.wait_for(_running(h.job_id))
            _config(tmp_path, {"tok-bob": "bob"}, {"first": "tests.agents:echo", "late": "tests.late_agents:hello"})
            os.kill(srv.pid, signal.SIGHUP)
            await _wait_stderr_async(srv, "SIGHUP: configuration reloaded")
            async with sdk_session(srv.url, token="tok-bob") as (b, _):
                assert "late" in _agents(b)
                done = await b.submit(agent="late", input="x")
                assert (await asyncio.wait_for(done.done, 15)).result == {"hello": "x"}
            with pytest.raises(arcp.UnauthenticatedError):
                async with sdk_session(srv.url, token="tok-alice"):
                    pass
            term = await rec.terminal(h.job_id, timeout=15)  # the old session's job went on
            assert term["type"] == "job.result" and term["payload"]["result"] == {"slept": True}, term

    asyncio.run(go())
    assert srv.proc.poll() is None  # SIGHUP does not end the server


def test_sighup_applies_admins_and_quotas_to_new_sessions_and_jobs(
        tmp_path: Path, make_server: type[Server]) -> None:
    tokens = {"tok-alice": "alice", "tok-ops": "ops"}
    cfg = _config(tmp_path, tokens, {})
    srv = make_server("--config", str(cfg))

    async def go() -> None:
        async with sdk_session(srv.url, token="tok-alice") as (a, rec), \
                sdk_session(srv.url, token="tok-ops") as (ops, _):
            first = await a.submit(agent="sleep", input={"seconds": 60})  # cancelled below
            assert first.job_id not in {j.job_id for j in (await ops.list_jobs()).jobs}
            _config(tmp_path, tokens, {}, head='[auth]\nadmins = ["ops"]\n[quotas]\nmax_jobs = 1\n')
            os.kill(srv.pid, signal.SIGHUP)
            await _wait_stderr_async(srv, "SIGHUP: configuration reloaded")
            assert first.job_id not in {j.job_id for j in (await ops.list_jobs()).jobs}  # fixed at its open
            async with sdk_session(srv.url, token="tok-ops") as (ops2, _):
                assert first.job_id in {j.job_id for j in (await ops2.list_jobs()).jobs}
            second = await a.submit(agent="echo", input=2)  # alice is at her new quota of 1
            queued = await rec.wait_for(lambda f: f.get("job_id") == second.job_id and f.get("type") == "job.event")
            assert queued["payload"]["body"]["phase"] == "queued", queued
            await a.cancel_job(first.job_id)  # her one running job ends: the queued one starts
            assert (await asyncio.wait_for(second.done, 15)).result == {"echo": 2}
            assert (await rec.terminal(first.job_id))["payload"]["code"] == "CANCELLED"

    asyncio.run(go())


def test_a_bad_config_or_agent_on_sighup_keeps_the_running_configuration(
        tmp_path: Path, make_server: type[Server]) -> None:
    cfg = _config(tmp_path, {"tok-alice": "alice"}, {"first": "tests.agents:echo"})
    srv = make_server("--config", str(cfg))

    async def still_served() -> None:
        async with sdk_session(srv.url, token="tok-alice") as (a, _):
            assert "first" in _agents(a) and "broken" not in _agents(a)
            done = await a.submit(agent="first", input=1)
            assert (await asyncio.wait_for(done.done, 15)).result == {"echo": 1}
        with pytest.raises(arcp.UnauthenticatedError):
            async with sdk_session(srv.url, token="tok-new"):
                pass

    cfg.write_text("not toml [\n")
    os.kill(srv.pid, signal.SIGHUP)
    _wait_stderr(srv, "not valid TOML")
    assert any("keeping the running configuration" in line for line in srv.stderr_lines)
    asyncio.run(still_served())

    _config(tmp_path, {"tok-alice": "alice", "tok-new": "carol"},
            {"first": "tests.agents:echo", "broken": "tests.no_such_module:agent"})
    os.kill(srv.pid, signal.SIGHUP)
    _wait_stderr(srv, "agent broken@0.0.0 (tests.no_such_module:agent)")
    line = next(x for x in srv.stderr_lines if "tests.no_such_module" in x)
    assert "ModuleNotFoundError" in line and "keeping the running configuration" in line, line
    asyncio.run(still_served())
    assert srv.proc.poll() is None


HELLO = {"arcp": "1.1", "id": "01JZ3J8M0000000000000000AA", "type": "session.hello",
         "payload": {"client": {"name": "file", "version": "1"}, "auth": {"scheme": "bearer", "token": ""},
                     "capabilities": {"features": ["heartbeat"]}}}


def _submit(n: int, agent: str, input: object) -> dict[str, object]:
    return {"arcp": "1.1", "id": f"01JZ3J8M00000000000000000{n}", "type": "job.submit",
            "payload": {"agent": agent, "input": input}}


@pytest.mark.parametrize("kind", ["files", "pipes"])
def test_stdio_input_that_ends_gets_every_terminal_then_exit_0(tmp_path: Path, kind: str) -> None:
    """stdin a file (stdout a file), or a pipe that ends (stdout a pipe)."""
    lines = [HELLO, _submit(1, "sleep", {"seconds": 1.5}), _submit(2, "echo", {"k": 2})]
    data = b"".join(orjson.dumps(x) + b"\n" for x in lines)
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out.jsonl"
    argv = [str(EXE), "run", "--stdio", *agent_flags()]
    with open(tmp_path / "err.txt", "wb") as stderr:
        if kind == "files":
            with open(src, "rb") as stdin, open(out, "wb") as stdout:
                r = subprocess.run(argv, cwd=ROOT, stdin=stdin, stdout=stdout, stderr=stderr, timeout=60,
                                   start_new_session=True)
        else:
            r = subprocess.run(argv, cwd=ROOT, input=data, stdout=subprocess.PIPE, stderr=stderr, timeout=60,
                               start_new_session=True)
            out.write_bytes(r.stdout)
    err = (tmp_path / "err.txt").read_text()
    assert r.returncode == 0, err[-3000:]
    frames = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    accepted = {f["payload"]["request_id"]: f["job_id"] for f in frames if f["type"] == "job.accepted"}
    assert len(accepted) == 2, frames
    terminals = {f["job_id"]: f for f in frames if f["type"] in ("job.result", "job.error")}
    assert terminals[accepted[_submit(1, "", None)["id"]]]["payload"]["result"] == {"slept": True}
    assert terminals[accepted[_submit(2, "", None)["id"]]]["payload"]["result"] == {"echo": {"k": 2}}


def test_stdio_sigterm_drains_the_session(tmp_path: Path) -> None:
    """SIGTERM in stdio mode: the running job may end, its terminal is written, exit 0."""
    async def go() -> None:
        proc = await asyncio.create_subprocess_exec(
            str(EXE), "run", "--stdio", "--drain-timeout", "20", *agent_flags(), cwd=ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True, limit=16 * 1024 * 1024)
        try:
            client = ARCPClient(client=arcp.ClientInfo(name="stdio", version="1"), token="")
            rec = Recorder(await arcp.StdioTransport.from_process_pipes(proc))
            await asyncio.wait_for(client.connect(rec), 15)
            h = await client.submit(agent="sleep", input={"seconds": 1.5})
            await rec.wait_for(_running(h.job_id))
            proc.send_signal(signal.SIGTERM)
            r = await asyncio.wait_for(h.done, 15)
            assert r.result == {"slept": True}
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
    asyncio.run(go())


@pytest.mark.parametrize("agent", ["sleep", "spin"])
def test_a_cancel_read_with_its_job_is_not_lost(make_server: type[Server], agent: str) -> None:
    """The worker reads its job and the job's cancel at once (it was not scheduled between
    them): the cancel is the job's, and the job ends at once instead of after the 30 s grace
    (it used to be dropped: the worker had no job yet when it read it)."""
    import psutil

    from tests.conftest import fork_server_pids

    srv = make_server("--grace", "30")

    def workers() -> list[psutil.Process]:
        return [w for fs in fork_server_pids(srv.pid) for w in psutil.Process(fs).children()]

    async def go() -> float:
        async with sdk_session(srv.url) as (client, rec):
            deadline = time.monotonic() + 10
            while not workers() and time.monotonic() < deadline:  # the warm workers
                await asyncio.sleep(0.05)
            stopped = workers()
            assert stopped
            for w in stopped:
                w.suspend()
            try:
                h = await client.submit(agent=agent, input={"seconds": 30})
                await asyncio.sleep(0.3)  # the job is written to a stopped worker's pipe
                await client.cancel_job(h.job_id)
                await asyncio.sleep(0.3)  # and its cancel after it
            finally:
                for w in stopped:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        w.resume()
            t0 = time.monotonic()
            term = await rec.terminal(h.job_id, timeout=20)
            assert term["type"] == "job.error" and term["payload"]["code"] == "CANCELLED", term
            return time.monotonic() - t0

    assert asyncio.run(go()) < 10  # not the grace
