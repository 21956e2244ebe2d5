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
from pathlib import Path
from typing import Any

import arcp
import psycopg
import pytest
from arcp import ClientInfo, SessionResume, WebSocketTransport
from arcp.client import ARCPClient
from websockets.asyncio.client import connect

from tests.conftest import Server
from tests.interop.client import FEATURES, Recorder, listed, resume_once_detached, sdk_session
from tests.postgres import PgServer, pg_server, pg_url  # noqa: F401 (fixtures)

HEARTBEAT, TIMEOUT = "0.5", "3"  # a lost node is found within seconds
# Each test takes pg_url before make_server: fixtures end in the reverse order, so its servers
# stop before its database is dropped (else they would spend their stop reconnecting to it).


def nodes(make_server: type[Server], url: str, n: int, *extra: str) -> list[Server]:
    return [make_server("--state-url", url, "--node-id", f"node{i}", "--node-heartbeat", HEARTBEAT,
                        "--node-timeout", TIMEOUT, *extra) for i in range(n)]


def _client(*features: str) -> ARCPClient:
    return ARCPClient(client=ClientInfo(name="tests", version="1"), token="", features=FEATURES + features)


async def _open(url: str, *features: str) -> tuple[ARCPClient, Recorder, Any, Any]:
    conn = await connect(url)
    rec = Recorder(WebSocketTransport(conn))
    client = _client(*features)
    welcome = await client.connect(rec)
    return client, rec, conn, welcome


def _ticks(rec: Recorder, job_id: str) -> list[str]:
    return [f["payload"]["body"]["message"] for f in rec.frames
            if f.get("type") == "job.event" and f.get("job_id") == job_id and f["payload"]["kind"] == "log"]


def _seqs(rec: Recorder) -> list[int]:
    return [f["event_seq"] for f in rec.frames if "event_seq" in f]


def test_a_session_resumes_on_another_process_with_every_frame_in_order(pg_url: str,
                                                                         make_server: type[Server]) -> None:
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


def test_subscribe_list_and_cancel_reach_the_process_running_the_job(pg_url: str, make_server: type[Server],
                                                                      tmp_path: Any) -> None:
    cfg = tmp_path / "auth.toml"
    cfg.write_text('[auth]\ntokens = { a = "alice", b = "bob", r = "root" }\nadmins = ["root"]\n')
    a, b = nodes(make_server, pg_url, 2, "--config", str(cfg))

    async def go() -> None:
        async with sdk_session(a.url, token="a") as (alice, reca), \
                sdk_session(b.url, token="a") as (alice_b, recab), \
                sdk_session(b.url, token="b") as (bob, recb), \
                sdk_session(b.url, token="r") as (root, recr):
            ticker = await alice.submit(agent="ticker", input={"n": 30, "interval": 0.03})
            long = await alice.submit(agent="sleep", input={"seconds": 60})
            other = await alice.submit(agent="sleep", input={"seconds": 60})
            await reca.wait_for(lambda f: f.get("job_id") == ticker.job_id and f.get("type") == "job.event")

            # listing on b sees a's jobs (running, then finished)
            found = await listed(alice_b, ticker.job_id, long.job_id)
            assert found[long.job_id].status == "running"
            await bob.list_jobs()
            assert [f for f in recb.frames if f.get("type") == "session.jobs"][-1]["payload"]["jobs"] == []

            # a subscription through b: the history, then live, then the terminal, once each and in order
            with pytest.raises(arcp.PermissionDeniedError):
                await bob.subscribe(ticker.job_id, history=True)
            await alice_b.subscribe(ticker.job_id, history=True)
            term = await recab.terminal(ticker.job_id, timeout=30)
            assert term["type"] == "job.result" and term["payload"]["result"] == {"ticks": 30}
            assert _ticks(recab, ticker.job_id) == [f"tick {i}" for i in range(30)]
            mine = [f["event_seq"] for f in recab.frames if "event_seq" in f]
            assert mine == sorted(mine) and len(set(mine)) == len(mine)
            assert (await listed(alice_b, ticker.job_id))[ticker.job_id].status == "success"
            # a finished job of another process: subscribed to from the database
            async with sdk_session(b.url, token="a") as (late, recl):
                await late.subscribe(ticker.job_id, history=True)
                assert (await recl.terminal(ticker.job_id))["payload"]["result"] == {"ticks": 30}
                assert _ticks(recl, ticker.job_id) == [f"tick {i}" for i in range(30)]

            # a cancel through b: refused for another principal, done for an admin
            await bob.cancel_job(long.job_id)
            await bob.list_jobs()
            assert (await listed(alice, long.job_id))[long.job_id].status == "running"
            await root.cancel_job(long.job_id, reason="operator stop")
            err = await reca.terminal(long.job_id, timeout=15)
            assert err["payload"]["code"] == "CANCELLED"
            assert any(f.get("type") == "job.cancelled" and f.get("job_id") == long.job_id for f in reca.frames)
    asyncio.run(go())


def test_the_owner_cancels_through_another_process_after_resuming_there(pg_url: str,
                                                                        make_server: type[Server]) -> None:
    a, b = nodes(make_server, pg_url, 2)

    async def go() -> None:
        client, rec, conn, welcome = await _open(a.url)
        h = (await client.submit(agent="sleep", input={"seconds": 60})).job_id
        await rec.wait_for(lambda f: f.get("type") == "job.accepted")
        conn.transport.abort()
        c2, _, rec2, conn2 = await resume_once_detached(b.url, SessionResume(
            session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=0))
        await c2.cancel_job(h, reason="changed my mind")
        term = await rec2.terminal(h, timeout=15)
        assert term["payload"]["code"] == "CANCELLED"
        cancelled = [f for f in rec2.frames if f.get("type") == "job.cancelled" and f.get("job_id") == h]
        assert len(cancelled) == 1 and cancelled[0]["event_seq"] < term["event_seq"]
        conn2.transport.abort()  # (a client that goes: the servers' stops need not wait for it)
    asyncio.run(go())


def test_an_idempotency_key_raced_on_two_processes_makes_one_job(pg_url: str, make_server: type[Server]) -> None:
    a, b = nodes(make_server, pg_url, 2)

    async def go() -> None:
        async with sdk_session(a.url) as (ca, reca), sdk_session(b.url) as (cb, recb):
            for round_ in range(5):
                key = f"race-{round_}"
                ha, hb = await asyncio.gather(
                    ca.submit(agent="ticker", input={"n": 3, "interval": 0.02}, idempotency_key=key),
                    cb.submit(agent="ticker", input={"n": 3, "interval": 0.02}, idempotency_key=key))
                assert ha.job_id == hb.job_id, f"round {round_}: two jobs for one key"
                for rec in (reca, recb):  # each submitter sees the job to its end
                    assert (await rec.terminal(ha.job_id, timeout=15))["payload"]["result"] == {"ticks": 3}
            with pytest.raises(arcp.ARCPError) as e:  # the same key with other parameters
                await cb.submit(agent="echo", input="other", idempotency_key="race-0")
            assert e.value.code == "DUPLICATE_KEY"
    asyncio.run(go())


def test_a_killed_process_has_its_jobs_ended_retryable_through_the_others(pg_url: str,
                                                                          make_server: type[Server]) -> None:
    a, b, c = nodes(make_server, pg_url, 3)

    async def go() -> None:
        client, rec, conn, welcome = await _open(a.url)
        jobs = [(await client.submit(agent="sleep", input={"seconds": 60})).job_id for _ in range(3)]
        await rec.wait_for(lambda f: f.get("job_id") == jobs[-1] and f.get("type") == "job.accepted")
        async with sdk_session(b.url) as (watcher, recw):
            await watcher.subscribe(jobs[0], history=False)  # another process's session follows one
            await recw.wait_for(lambda f: f.get("type") == "job.subscribed")
            killed = time.monotonic()
            os.killpg(a.pid, signal.SIGKILL)
            # the session's client comes back through another process and hears of its jobs' end
            _, _, rec2, conn2 = await resume_once_detached(c.url, SessionResume(
                session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=0), timeout=30)
            for job_id in jobs:
                term = await rec2.terminal(job_id, timeout=float(TIMEOUT) + 10)
                assert term["type"] == "job.error"
                p = term["payload"]
                assert p["code"] == "INTERNAL_ERROR" and p["retryable"] is True
                assert p["details"] == {"reason": "node lost", "node": "node0"}
            assert time.monotonic() - killed < float(TIMEOUT) + 2 + 1.5  # (the resume's own waits aside)
            seqs = _seqs(rec2)
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            # the follower hears of it too
            followed = await recw.terminal(jobs[0], timeout=10)
            assert followed["payload"]["details"] == {"reason": "node lost", "node": "node0"}
            # listed as ended on every live process
            found = await listed(watcher, *jobs)
            assert all(found[j].status == "error" for j in jobs)
            conn2.transport.abort()
    asyncio.run(go())


def test_postgres_stopped_for_five_seconds_under_load_loses_nothing(pg_server: PgServer, pg_url: str,
                                                                     make_server: type[Server]) -> None:
    a, b = nodes(make_server, pg_url, 2, "--node-timeout", "30")  # (no node is taken for lost meanwhile)

    async def go() -> None:
        client, rec, conn, welcome = await _open(a.url)
        jobs = [(await client.submit(agent="ticker", input={"n": 100, "interval": 0.1})).job_id for _ in range(4)]
        await rec.wait_for(lambda f: f.get("type") == "job.event" and f.get("job_id") == jobs[-1])
        await asyncio.to_thread(pg_server.halt)
        try:
            await asyncio.sleep(5)
        finally:
            await asyncio.to_thread(pg_server.start)
        for job_id in jobs:  # the jobs ran on, and their client saw everything
            assert (await rec.terminal(job_id, timeout=60))["payload"]["result"] == {"ticks": 100}
            assert _ticks(rec, job_id) == [f"tick {i}" for i in range(100)]
        # every frame was logged once the database was back: a resume on the other process gets them all
        conn.transport.abort()
        _, _, rec2, conn2 = await resume_once_detached(b.url, SessionResume(
            session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=0), timeout=30)
        for job_id in jobs:
            await rec2.terminal(job_id, timeout=30)
            assert _ticks(rec2, job_id) == [f"tick {i}" for i in range(100)]
        assert _seqs(rec2) == _seqs(rec)
        conn2.transport.abort()
    asyncio.run(go())


def test_a_process_declared_lost_while_alive_stops_and_writes_nothing_over_the_others(
        pg_url: str, make_server: type[Server]) -> None:
    """A process cut off (here: stopped) past the node timeout is declared lost and its jobs
    ended by another; when it runs again it finds that out, closes its clients, writes none of
    its own ends over the terminals the others wrote, and exits 1. Its session, resumed on the
    other process, has one terminal per job."""
    a, b = nodes(make_server, pg_url, 2)

    async def go() -> None:
        client, rec, conn, welcome = await _open(a.url)
        h = (await client.submit(agent="sleep", input={"seconds": 60})).job_id
        await rec.wait_for(lambda f: f.get("type") == "job.accepted")
        os.kill(a.pid, signal.SIGSTOP)
        try:
            await b.wait_stderr_async("node node0 declared lost", timeout=float(TIMEOUT) + 10)
            _, _, rec2, conn2 = await resume_once_detached(b.url, SessionResume(
                session_id=welcome.session_id, resume_token=welcome.resume_token, last_event_seq=0), timeout=30)
            term = await rec2.terminal(h, timeout=10)
            assert term["payload"]["details"] == {"reason": "node lost", "node": "node0"}
        finally:
            os.kill(a.pid, signal.SIGCONT)
        assert await asyncio.to_thread(a.proc.wait, 30) == 1
        assert any("declared lost by node node1" in line for line in a.stderr_lines), "".join(a.stderr_lines[-20:])
        assert not any(f.get("type") in ("job.result", "job.error") and f.get("payload", {}).get("code") != "INTERNAL_ERROR"
                       for f in rec.frames), "the lost process told its client of its own end of the job"
        # the session's log has the one terminal, from the process that declared the loss
        conn2.transport.abort()
        _, _, rec3, conn3 = await resume_once_detached(b.url, SessionResume(
            session_id=welcome.session_id, resume_token=(await _token(rec2)), last_event_seq=0), timeout=30)
        try:
            await rec3.terminal(h, timeout=10)
        except TimeoutError:
            raise AssertionError(f"no terminal replayed: {[(f.get('type'), f.get('event_seq')) for f in rec3.frames]}; "
                                 f"live before: {[(f.get('type'), f.get('event_seq')) for f in rec2.frames]}") from None
        ends = [f for f in rec3.frames if f.get("job_id") == h and f.get("type") in ("job.result", "job.error")]
        assert len(ends) == 1 and ends[0]["payload"]["details"]["reason"] == "node lost"
        assert _seqs(rec3) == sorted(set(_seqs(rec3)))
        conn3.transport.abort()
    asyncio.run(go())


async def _token(rec: Recorder) -> str:
    welcome = next(f for f in rec.frames if f.get("type") == "session.welcome")
    return str(welcome["payload"]["resume_token"])


def test_a_process_that_starts_keeps_the_others_credentials_and_a_lost_ones_are_revoked(
        pg_url: str, make_server: type[Server], tmp_path: Path) -> None:
    cfg = tmp_path / "creds.toml"
    cfg.write_text('[credentials]\nprovisioner = "static"\n')
    a, = nodes(make_server, pg_url, 1, "--config", str(cfg))

    def unrevoked() -> set[str]:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            return {r[0] for r in conn.execute("SELECT credential_id FROM credentials")}

    async def go() -> None:
        client, rec, conn, _ = await _open(a.url, "provisioned_credentials")
        job = await client.submit(agent="sleep", input={"seconds": 60})
        accepted = await rec.wait_for(lambda f: f.get("job_id") == job.job_id and f.get("type") == "job.accepted")
        cred = accepted["payload"]["credentials"][0]["id"]
        assert cred in unrevoked()
        # a second process starts: it revokes what finished jobs left, not a running job's
        b, = (make_server("--state-url", pg_url, "--node-id", "node1", "--node-heartbeat", HEARTBEAT,
                          "--node-timeout", TIMEOUT, "--config", str(cfg)),)
        assert cred in unrevoked(), "the start of another process revoked a running job's credential"
        # the job's process dies: the one left declares it lost and revokes its job's credential
        os.killpg(a.pid, signal.SIGKILL)
        deadline = time.monotonic() + 4 * float(TIMEOUT) + 10
        while cred in unrevoked() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert cred not in unrevoked(), "a lost process's job kept its credential"
        assert any("never revoked" in line and cred in line for line in b.stderr_lines)
        conn.transport.abort()
    asyncio.run(go())
