"""Sessions that survive: resume, heartbeats, acks, list/subscribe, close, restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import arcp
import pytest
from arcp import ClientInfo, SessionResume, WebSocketTransport
from arcp.client import ARCPClient
from websockets.asyncio.client import connect

from tests.conftest import Server
from tests.interop.client import FEATURES, Recorder, job_ended, listed, resume_once_detached, sdk_session


def _client() -> ARCPClient:
    return ARCPClient(client=ClientInfo(name="tests", version="1"), token="", features=FEATURES)


async def _events(rec: Recorder, job_id: str) -> list[str]:
    return [f["payload"]["body"]["message"] for f in rec.frames
            if f.get("type") == "job.event" and f.get("job_id") == job_id
            and f["payload"]["kind"] == "log"]


def test_resume_replays_every_missed_event_in_order(server: Server) -> None:
    async def go() -> None:
        conn = await connect(server.url)
        rec = Recorder(WebSocketTransport(conn))
        client = _client()
        welcome = await client.connect(rec)
        h = await client.submit(agent="ticker", input={"n": 30, "interval": 0.02})
        await rec.wait_for(lambda f: f.get("type") == "job.event" and f["payload"]["body"].get("message") == "tick 3")
        last = max(f["event_seq"] for f in rec.frames if "event_seq" in f)
        conn.transport.abort()  # a network cut: no close, no bye
        await job_ended(server.url, h.job_id)  # the job goes on and finishes while we are away

        _, w2, rec2, conn2 = await resume_once_detached(server.url, SessionResume(
            session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=last))
        assert w2.session_id == welcome.session_id and w2.resume_token != welcome.resume_token
        term = await rec2.terminal(h.job_id)
        assert term["payload"]["result"] == {"ticks": 30}
        seqs = [f["event_seq"] for f in rec2.frames if "event_seq" in f]
        assert seqs == list(range(last + 1, last + 1 + len(seqs)))
        before = await _events(rec, h.job_id)
        after = await _events(rec2, h.job_id)
        assert before + after == [f"tick {i}" for i in range(30)]

        # the old token is dead, and a wrong one fails without consuming the session
        conn2.transport.abort()
        for token, err in ((welcome.resume_token, arcp.UnauthenticatedError), ("rtk_bogus", arcp.UnauthenticatedError)):
            with pytest.raises(err):
                await resume_once_detached(server.url, SessionResume(
                    session_id=welcome.session_id, resume_token=token, last_event_seq=0))
        _, w3, _, _ = await resume_once_detached(server.url, SessionResume(
            session_id=welcome.session_id, resume_token=w2.resume_token, last_event_seq=0))
        assert w3.session_id == welcome.session_id
    asyncio.run(go())


def test_resume_of_unknown_session_is_window_expired(server: Server) -> None:
    async def go() -> None:
        with pytest.raises(arcp.ARCPError) as ei:
            await _client().resume(await WebSocketTransport.connect(server.url), resume=SessionResume(
                session_id="sess_01ARZ3NDEKTSV4RRFFQ69G5FAV", resume_token="rtk_x", last_event_seq=0))
        assert ei.value.code == "RESUME_WINDOW_EXPIRED"
    asyncio.run(go())


def test_heartbeat_pings_and_ends_a_silent_session(make_server: type[Server]) -> None:
    srv = make_server("--heartbeat-interval", "1")

    async def go() -> None:
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "type": "session.hello",
                                      "payload": {"client": {"name": "quiet"}, "auth": {"token": ""},
                                                  "capabilities": {"features": ["heartbeat"]}}}))
            frames = []
            async with asyncio.timeout(10):
                async for msg in ws:  # never answer: a ping, then HEARTBEAT_LOST and a close
                    frames.append(json.loads(msg))
        types = [f["type"] for f in frames]
        assert "session.ping" in types
        err = next(f for f in frames if f["type"] == "session.error")
        assert err["payload"]["code"] == "HEARTBEAT_LOST" and err["payload"]["retryable"] is True
    asyncio.run(go())


def test_subscribe_from_another_session_and_principals(make_server: type[Server]) -> None:
    srv = make_server("--token", "ta=alice", "--token", "tb=bob")

    async def go() -> None:
        async with sdk_session(srv.url, token="ta") as (a, reca), sdk_session(srv.url, token="ta") as (b, recb), \
                sdk_session(srv.url, token="tb") as (bob, _):
            h = await a.submit(agent="ticker", input={"n": 10, "interval": 0.05})
            await reca.wait_for(lambda f: f.get("type") == "job.event" and f["payload"]["body"].get("message") == "tick 2")
            with pytest.raises(arcp.PermissionDeniedError):
                await bob.subscribe(h.job_id, history=True)
            await b.subscribe(h.job_id, history=True)
            await recb.terminal(h.job_id)
            assert await _events(recb, h.job_id) == [f"tick {i}" for i in range(10)]
            seqs = [f["event_seq"] for f in recb.frames if "event_seq" in f]
            assert seqs == list(range(1, len(seqs) + 1))
            bobs = await bob.list_jobs()
            assert h.job_id not in {j.job_id for j in bobs.jobs}
    asyncio.run(go())


def test_close_keeps_jobs_running(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (a, _):
            h = await a.submit(agent="sleep", input={"seconds": 0.5})
            job_id = h.job_id
        await job_ended(server.url, job_id)  # a session of its own sees the end
        async with sdk_session(server.url) as (b, recb):
            entry = (await listed(b, job_id))[job_id]
            assert entry.status == "success"
            await b.subscribe(job_id, history=False)
            term = await recb.terminal(job_id)
            assert term["payload"]["result"] == {"slept": True}
    asyncio.run(go())


def test_state_survives_kill_9(tmp_path: Path, make_server: type[Server]) -> None:
    state = str(tmp_path / "state")
    srv = make_server("--state-dir", state)

    async def before() -> tuple[str, str, dict[str, object]]:
        async with sdk_session(srv.url) as (c, rec):
            done = await c.submit(agent="echo", input={"k": 1}, idempotency_key="key-1")
            await asyncio.wait_for(done.done, 15)
            running = await c.submit(agent="sleep", input={"seconds": 60})
            await rec.wait_for(lambda f: f.get("job_id") == running.job_id and f.get("type") == "job.event"
                               and f["payload"]["kind"] == "log")  # "sleeping": it runs
            return done.job_id, running.job_id, done.accepted.model_dump(mode="json", exclude={"request_id"})

    done_id, running_id, accepted = asyncio.run(before())
    os.killpg(srv.pid, signal.SIGKILL)
    srv.proc.wait(5)
    srv2 = make_server("--state-dir", state)

    async def after() -> None:
        async with sdk_session(srv2.url) as (c, rec):
            entries = await listed(c, done_id, running_id)
            assert entries[done_id].status == "success"
            assert entries[running_id].status == "error"
            again = await c.submit(agent="echo", input={"k": 1}, idempotency_key="key-1")
            assert again.job_id == done_id
            assert again.accepted.model_dump(mode="json", exclude={"request_id"}) == accepted
            assert (await asyncio.wait_for(again.done, 15)).result == {"echo": {"k": 1}}
            await c.subscribe(running_id)
            term = await rec.terminal(running_id)
            assert term["payload"]["code"] == "INTERNAL_ERROR" and term["payload"]["retryable"] is True
    asyncio.run(after())


def test_bad_session_input_gets_clear_errors(server: Server) -> None:
    async def go() -> None:
        async with connect(server.url) as ws:
            await ws.send(json.dumps({"arcp": "1.1", "id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "type": "session.hello",
                                      "payload": {"client": {"name": "raw"}, "auth": {"token": ""},
                                                  "capabilities": {"features": list(FEATURES)}}}))
            sid = json.loads(await ws.recv())["session_id"]
            cases = [
                ("session.ack", {"last_processed_seq": 99}, "beyond"),
                ("session.ack", {"last_processed_seq": "x"}, "last_processed_seq"),
                ("job.subscribe", {"job_id": "job_01ARZ3NDEKTSV4RRFFQ69G5FAV"}, "no job"),
                ("session.list_jobs", {"filter": {"status": 3}}, "status"),
                ("session.list_jobs", {"cursor": "garbage"}, "cursor"),
                ("session.list_jobs", {"filter": {"created_after": "yesterday"}}, "timestamp"),
            ]
            for i, (t, payload, words) in enumerate(cases):
                await ws.send(json.dumps({"arcp": "1.1", "id": f"req{i}", "type": t, "session_id": sid,
                                          "payload": payload}))
                err = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert err["type"] == "session.error", (t, err)
                assert words in err["payload"]["message"], (t, err)
                assert err["payload"]["request_id"] == f"req{i}"
    asyncio.run(go())


def test_back_pressure_status_for_a_client_that_does_not_ack(make_server: type[Server]) -> None:
    srv = make_server("--back-pressure-threshold", "20")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):  # acks are negotiated, never sent
            h = await client.submit(agent="logs", input={"n": 60})
            await rec.terminal(h.job_id)
            bp = [f for f in rec.frames if f.get("type") == "job.event"
                  and f["payload"]["kind"] == "status" and f["payload"]["body"]["phase"] == "back_pressure"]
            assert len(bp) == 1, "signalled once until an ack brings the lag down"
            d = bp[0]["payload"]["body"]["details"]
            assert d["threshold"] == 20 and d["last_ack"] == 0 and d["current_seq"] == bp[0]["event_seq"]
            await client.ack(client.latest_event_seq)
            h2 = await client.submit(agent="logs", input={"n": 30})
            await rec.terminal(h2.job_id)
            again = [f for f in rec.frames if f.get("job_id") == h2.job_id and f.get("type") == "job.event"
                     and f["payload"]["body"].get("phase") == "back_pressure"]
            assert len(again) == 1, "re-armed by the ack"
    asyncio.run(go())


def test_a_subscriber_cannot_cancel(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (a, reca), sdk_session(server.url) as (b, recb):
            h = await a.submit(agent="ticker", input={"n": 8, "interval": 0.05})
            await b.subscribe(h.job_id, history=False)
            await b.cancel_job(h.job_id)  # not the submitting session: ignored (Python flavour: silently)
            term = await reca.terminal(h.job_id)
            assert term["type"] == "job.result" and term["payload"]["result"] == {"ticks": 8}
            assert (await recb.terminal(h.job_id))["type"] == "job.result"
            assert not any(f.get("type") == "job.cancelled" for f in reca.frames + recb.frames)
    asyncio.run(go())


def _log_numbers(rec: Recorder, job_id: str) -> list[int]:
    return [int(m.split(":", 1)[0]) for m in
            (f["payload"]["body"]["message"] for f in rec.frames
             if f.get("type") == "job.event" and f.get("job_id") == job_id and f["payload"]["kind"] == "log")]


def test_resume_from_before_the_kept_log_is_window_expired(make_server: type[Server]) -> None:
    srv = make_server("--session-log-bytes", "1M")

    async def go() -> None:
        conn = await connect(srv.url, max_size=4 * 1024 * 1024)
        rec = Recorder(WebSocketTransport(conn))
        client = _client()
        welcome = await client.connect(rec)
        h = await client.submit(agent="flood", input={"n": 24, "size": 128 * 1024})  # 3 MiB
        await rec.terminal(h.job_id)
        last = max(f["event_seq"] for f in rec.frames if "event_seq" in f)
        conn.transport.abort()
        resume = SessionResume(session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=2)
        with pytest.raises(arcp.ARCPError) as ei:
            await resume_once_detached(srv.url, resume)
        assert ei.value.code == "RESUME_WINDOW_EXPIRED" and "no longer kept" in ei.value.message
        _, _, rec2, _ = await resume_once_detached(srv.url, SessionResume(  # within the kept log: replayed
            session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=last - 3))
        await rec2.terminal(h.job_id)
        assert [f["event_seq"] for f in rec2.frames if "event_seq" in f] == [last - 2, last - 1, last]
        assert _log_numbers(rec2, h.job_id) == [22, 23]
    asyncio.run(go())
