"""The supervisor's log as an operator reads it: `--log-format json` puts one JSON object on
every stderr line (the fork server's and the workers' output too), with a record of each
job's start and end, failed authentications without the token, limit kills, and no
per-connection chatter at info."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tests.conftest import Server, fork_server_pids
from tests.interop.client import sdk_session

TOKEN = "tok-good-7f3a"
WRONG = "tok-wrong-93c1e0"
LIMITS = "x-vendor.arcp-supervisor.limits"


@pytest.fixture(scope="module")
def json_server() -> Iterator[Server]:
    s = Server("--log-format", "json", "--token", f"{TOKEN}=alice", "--agent", "noisy=tests.noisy_agent:run")
    yield s
    s.stop()


def _record(line: str) -> dict[str, Any]:
    obj = json.loads(line)  # every line, whoever wrote it
    assert isinstance(obj, dict) and {"ts", "level", "logger", "msg"} <= set(obj), line
    return obj


def _records(srv: Server) -> list[dict[str, Any]]:
    return [_record(line) for line in list(srv.stderr_lines)]


def _wait_for(srv: Server, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
    """The first record `pred` accepts, waiting for the server to write it."""
    return _record(srv.wait_stderr(lambda line: pred(_record(line)), timeout))


async def _job(url: str, agent: str, input: Any, lease: dict[str, Any] | None = None) -> tuple[str, str, dict]:
    async with sdk_session(url, token=TOKEN) as (client, rec):
        h = await client.submit(agent=agent, input=input, lease_request=lease)
        term = await rec.terminal(h.job_id, timeout=30)
        return h.job_id, str(client.session_id), term


def test_every_line_is_json_and_jobs_have_start_and_end_records(json_server: Server) -> None:
    job_id, session_id, term = asyncio.run(_job(json_server.url, "noisy", {}))
    assert term["type"] == "job.result", term
    start = _wait_for(json_server, lambda r: r.get("job_id") == job_id and r["msg"] == "job started")
    end = _wait_for(json_server, lambda r: r.get("job_id") == job_id and r["msg"].startswith("job ended"))
    for r in (start, end):
        assert r["level"] == "info" and r["session_id"] == session_id and r["principal"] == "alice", r
        assert r["agent"] == "noisy@0.0.0", r
    assert end["outcome"] == "success" and end["code"] is None, end
    assert end["duration_s"] > 0 and end["cpu_s"] >= 0 and end["memory_peak_mb"] > 0, end
    # A job's output and log events (and what its module prints when imported) are its
    # client's, never the supervisor's log.
    assert not any("noisy agent" in line for line in json_server.stderr_lines)


def test_what_the_fork_server_writes_becomes_records(json_server: Server) -> None:
    fork_server = psutil.Process(fork_server_pids(json_server.pid)[0])
    for fd in (1, 2):  # what it (or a worker not yet given a job) prints, a traceback say
        with open(f"/proc/{fork_server.pid}/fd/{fd}", "w") as out:
            out.write(f'fork server line on fd {fd}\n{{"level": "forged"}} \x1b[2J\n')
    for fd in (1, 2):
        rec = _wait_for(json_server, lambda r: r["msg"] == f"fork server line on fd {fd}")
        assert rec["logger"] == "arcp.forkserver" and rec["level"] == "warning", rec
    _wait_for(json_server, lambda r: r["msg"] == '{"level": "forged"} \\e[2J')


def test_an_error_end_names_its_code(json_server: Server) -> None:
    job_id, _, term = asyncio.run(_job(json_server.url, "raises", {}))
    assert term["type"] == "job.error"
    end = _wait_for(json_server, lambda r: r.get("job_id") == job_id and r["msg"].startswith("job ended"))
    assert end["outcome"] == "error" and end["code"] == "INTERNAL_ERROR", end


def test_a_failed_authentication_is_a_warning_without_the_token(json_server: Server) -> None:
    async def go() -> None:
        with pytest.raises(Exception):
            async with sdk_session(json_server.url, token=WRONG):
                pass
    asyncio.run(go())
    rec = _wait_for(json_server, lambda r: r["msg"].startswith("authentication failed"))
    assert rec["level"] == "warning" and rec["logger"] == "arcp.connection", rec
    assert rec["remote"].startswith("127.0.0.1:") and rec["principal"] is None, rec
    assert not any(WRONG in line or TOKEN in line for line in json_server.stderr_lines)


def test_a_limit_kill_is_a_warning_naming_the_job_and_the_limit(json_server: Server) -> None:
    job_id, _, term = asyncio.run(_job(json_server.url, "touchmem", {"mib": 200, "hold": 1},
                                       {LIMITS: ["memory_mb:64"]}))
    assert term["type"] == "job.error" and term["payload"]["details"]["limit"] == "memory_mb", term
    rec = _wait_for(json_server, lambda r: r.get("job_id") == job_id and r["level"] == "warning"
                    and r.get("limit") == "memory_mb")
    assert rec["value"] == 64, rec
    end = _wait_for(json_server, lambda r: r.get("job_id") == job_id and r["msg"].startswith("job ended"))
    assert end["outcome"] == "limit", end


def test_no_connection_open_or_close_records_at_info(json_server: Server) -> None:
    asyncio.run(_job(json_server.url, "echo", {"x": 1}))
    records = _records(json_server)
    chatter = [r for r in records if r["logger"].startswith("websockets")
               or any(w in r["msg"] for w in ("connection open", "connection closed", "transport closed",
                                               " opened for ", "resumed after"))]
    assert chatter == [], chatter
    assert all(r["level"] != "debug" for r in records)
