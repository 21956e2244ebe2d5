"""Several supervisor processes sharing one PostgreSQL database serve as one (contract.md,
"Several machines"): a session resumes on another process and gets every frame in order with
its original event_seq; subscribe, list and cancel reach across; one job per idempotency key
however the submits are spread; a process killed with its jobs running has them ended
INTERNAL_ERROR (retryable, node lost) through the others; PostgreSQL stopped and started again
under load loses nothing. Each test starts its own processes on a database of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import arcp
import pytest
from arcp import ClientInfo, SessionResume, WebSocketTransport
from arcp.client import ARCPClient
from websockets.asyncio.client import connect

from tests.conftest import Server
from tests.interop.client import FEATURES, Recorder, listed, resume_once_detached, sdk_session
from tests.postgres import PgServer, pg_server, pg_url  # noqa: F401 (fixtures)

HEARTBEAT, TIMEOUT = "0.5", "3"  # a lost node is found within seconds


def nodes(make_server: type[Server], url: str, n: int, *extra: str) -> list[Server]:
    return [make_server("--state-url", url, "--node-id", f"node{i}", "--node-heartbeat", HEARTBEAT,
                        "--node-timeout", TIMEOUT, *extra) for i in range(n)]


def _client() -> ARCPClient:
    return ARCPClient(client=ClientInfo(name="tests", version="1"), token="", features=FEATURES)


async def _open(url: str) -> tuple[ARCPClient, Recorder, Any, Any]:
    conn = await connect(url)
    rec = Recorder(WebSocketTransport(conn))
    client = _client()
    welcome = await client.connect(rec)
    return client, rec, conn, welcome


def _ticks(rec: Recorder, job_id: str) -> list[str]:
    return [f["payload"]["body"]["message"] for f in rec.frames
            if f.get("type") == "job.event" and f.get("job_id") == job_id and f["payload"]["kind"] == "log"]


def _seqs(rec: Recorder) -> list[int]:
    return [f["event_seq"] for f in rec.frames if "event_seq" in f]


def test_a_session_resumes_on_another_process_with_every_frame_in_order(make_server: type[Server],
                                                                         pg_url: str) -> None:
    a, b = nodes(make_server, pg_url, 2)

    async def go() -> None:
        client, rec, conn, welcome = await _open(a.url)
        h = (await client.submit(agent="ticker", input={"n": 40, "interval": 0.03})).job_id
        await rec.wait_for(lambda f: f.get("type") == "job.event" and f["payload"]["body"].get("message") == "tick 3")
        last = max(_seqs(rec))
        conn.transport.abort()  # a network cut; the client comes back through the other process
        _, w2, rec2, conn2 = await resume_once_detached(b.url, SessionResume(
            session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=last))
        assert w2.session_id == welcome.session_id and w2.resume_token != welcome.resume_token
        term = await rec2.terminal(h, timeout=30)
        assert term["payload"]["result"] == {"ticks": 40}
        assert _ticks(rec, h) + _ticks(rec2, h) == [f"tick {i}" for i in range(40)]
        assert _seqs(rec2) == list(range(last + 1, last + 1 + len(_seqs(rec2))))  # gap-free, original numbers

        # and back to the first process, from the middle: the same frames again, unchanged
        conn2.transport.abort()
        mid = last + 5
        _, _, rec3, conn3 = await resume_once_detached(a.url, SessionResume(
            session_id=welcome.session_id, resume_token=w2.resume_token, last_event_seq=mid))
        again = await rec3.terminal(h, timeout=30)
        assert again["event_seq"] == term["event_seq"] and again["id"] == term["id"]
        assert _seqs(rec3) == list(range(mid + 1, term["event_seq"] + 1))
        # an old token is dead on every process
        conn3.transport.abort()
        for srv in (a, b):
            with pytest.raises(arcp.UnauthenticatedError):
                await resume_once_detached(srv.url, SessionResume(
                    session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=0))
    asyncio.run(go())
