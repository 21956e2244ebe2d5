"""Operating the supervisor with the official SDK client: admission (capacity, the queue, the
memory budget, quotas), the runtime ceiling and operators. Waits are bounded; timings are
asserted only with generous bounds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import arcp
import psutil
import pytest

from tests.conftest import Server, fork_server_pids
from tests.interop.client import Recorder, listed, sdk_session

LIMITS = "x-vendor.arcp-supervisor.limits"


def run(coro: Any) -> None:
    asyncio.run(coro)


def overlap(spans: list[dict[str, float]]) -> int:
    """The most jobs that ran at the same time, from the `span` agent's results."""
    edges = sorted([(s["start"], 1) for s in spans] + [(s["end"], -1) for s in spans],
                   key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    most = now = 0
    for _, d in edges:
        now += d
        most = max(most, now)
    return most


def statuses(rec: Recorder, job_id: str) -> list[dict[str, Any]]:
    return [f["payload"]["body"] for f in rec.frames if f.get("type") == "job.event" and f.get("job_id") == job_id
            and f["payload"]["kind"] == "status"]


def queued_position(rec: Recorder, job_id: str) -> int | None:
    q = [b for b in statuses(rec, job_id) if b.get("phase") == "queued"]
    assert len(q) <= 1, f"more than one queued status for {job_id}: {q}"
    if not q:
        return None
    assert q[0]["message"].startswith("position "), q
    return int(q[0]["message"].split()[1])


def session_errors(rec: Recorder) -> list[dict[str, Any]]:
    return [f["payload"] for f in rec.frames if f.get("type") == "session.error"]


# -- capacity and the queue ------------------------------------------------------------------------------

def test_a_flood_from_one_principal_does_not_starve_another(make_server: type[Server]) -> None:
    """300 jobs of 0.2 s from alice under --max-jobs 8 (at least 7.5 s of work); bob's job,
    submitted after them, ends after about two rounds of alice's jobs (one for a slot to
    come free, one while it runs), long before the flood does. Counted in jobs, not seconds:
    a loaded host slows both principals' jobs alike."""
    srv = make_server("--max-jobs", "8", "--token", "a=alice", "--token", "b=bob")

    def alice_done(rec: Recorder) -> int:
        return sum(1 for f in rec.frames if f.get("type") in ("job.result", "job.error"))

    async def go() -> None:
        async with sdk_session(srv.url, token="a") as (alice, reca), \
                sdk_session(srv.url, token="b") as (bob, recb):
            flood = await asyncio.gather(*(alice.submit(agent="span", input={"seconds": 0.2}) for _ in range(300)))
            before = alice_done(reca)
            assert before < 200, f"{before} of alice's jobs ended before bob's came: nothing left to wait behind"
            h = await bob.submit(agent="span", input={"seconds": 0.2})
            await asyncio.wait_for(h.done, 60)
            behind = alice_done(reca) - before
            assert behind < 40, f"{behind} of alice's jobs ended while bob's waited and ran (fair: about 16)"
            assert queued_position(recb, h.job_id) in (None, 1)
            results = await asyncio.wait_for(asyncio.gather(*(x.done for x in flood)), 90)
            spans = [r.result for r in results] + [(await h.done).result]
            assert overlap(spans) <= 8, "more than --max-jobs jobs ran at once"
            positions = [queued_position(reca, x.job_id) for x in flood]
            waited = [p for p in positions if p is not None]
            assert len(waited) >= 250, "the jobs beyond capacity were not told they are queued"
            assert all(1 <= p <= 300 for p in waited), waited
    run(go())


def test_queued_status_positions_and_cancel_of_a_queued_job(make_server: type[Server]) -> None:
    srv = make_server("--max-jobs", "1", "--grace", "30")  # a cancel that waited for a grace would show

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            first = await client.submit(agent="sleep", input={"seconds": 30})
            waiting = [await client.submit(agent="span", input={"seconds": 0.1}) for _ in range(3)]
            for i, h in enumerate(waiting):
                await rec.wait_for(lambda f, j=h.job_id: f.get("job_id") == j and f.get("type") == "job.event")
                assert queued_position(rec, h.job_id) == i + 1
            assert queued_position(rec, first.job_id) is None
            entries = await listed(client, *(h.job_id for h in waiting))
            assert [entries[h.job_id].status for h in waiting] == ["pending"] * 3
            # the accept comes first, then the queued status
            kinds = [f["type"] for f in rec.frames if f.get("job_id") == waiting[0].job_id]
            assert kinds[:2] == ["job.accepted", "job.event"], kinds

            t0 = time.monotonic()
            await client.cancel_job(waiting[0].job_id, reason="not now")
            term = await rec.terminal(waiting[0].job_id, timeout=20)
            # the running job sleeps 30 s and a stop's grace is 30 s: far from either
            assert time.monotonic() - t0 < 10.0, "a queued job's cancel waited for something"
            assert term["type"] == "job.error" and term["payload"]["code"] == "CANCELLED", term
            assert term["payload"]["message"] == "not now"
            assert any(f.get("type") == "job.cancelled" and f.get("job_id") == waiting[0].job_id for f in rec.frames)
            assert not any(f.get("type") in ("job.result", "job.error") and f.get("job_id") == first.job_id
                           for f in rec.frames), "the running job was touched"

            await client.cancel_job(first.job_id)  # the sleep agent ends at once when cancelled
            await rec.terminal(first.job_id, timeout=20)
            for h in waiting[1:]:
                assert (await asyncio.wait_for(h.done, 15)).result["end"] > 0
    run(go())


def test_beyond_max_queued_a_submit_is_overloaded(make_server: type[Server]) -> None:
    srv = make_server("--max-jobs", "1", "--max-queued", "2")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec), sdk_session(srv.url) as (other, reco):
            running = await client.submit(agent="sleep", input={"seconds": 30})
            queued = [await client.submit(agent="sleep", input={"seconds": 0.1}) for _ in range(2)]
            # (the 1.1.3 client fails every handle of its session on a session.error: another session)
            with pytest.raises(arcp.InternalError):
                await other.submit(agent="echo", input=1)
            (err,) = session_errors(reco)
            assert err["code"] == "INTERNAL_ERROR" and err["retryable"] is True, err
            assert err["details"] == {"reason": "overloaded"}, err
            await client.cancel_job(queued[0].job_id)  # room again
            await rec.terminal(queued[0].job_id, timeout=15)
            again = await client.submit(agent="echo", input=2)
            await client.cancel_job(running.job_id)
            assert (await asyncio.wait_for(again.done, 15)).result == {"echo": 2}
            await asyncio.wait_for(queued[1].done, 15)
    run(go())


def test_no_worker_is_forked_for_a_job_that_waits(make_server: type[Server]) -> None:
    srv = make_server("--max-jobs", "2")

    def workers() -> int:
        fork_server = psutil.Process(fork_server_pids(srv.pid)[0])
        return len(fork_server.children())

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            handles = [await client.submit(agent="sleep", input={"seconds": 1.0}) for _ in range(12)]
            most = 0
            for _ in range(20):
                most = max(most, workers())
                await asyncio.sleep(0.1)
            # 2 running, 2 warm, and one that is on its way out
            assert most <= 5, f"{most} workers for 2 running jobs and 10 waiting ones"
            for h in handles:
                await client.cancel_job(h.job_id)
            for h in handles:
                await rec.terminal(h.job_id, timeout=20)
    run(go())


# -- the memory budget and quotas ---------------------------------------------------------------------------

def test_the_memory_budget_caps_the_sum_of_running_limits(make_server: type[Server]) -> None:
    srv = make_server("--memory-budget", "512M")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, _):
            lease = {LIMITS: ["memory_mb:200"]}
            handles = [await client.submit(agent="span", input={"seconds": 0.5}, lease_request=lease)
                       for _ in range(6)]
            results = await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 30)
            assert overlap([r.result for r in results]) <= 2, "3 x 200 MiB ran under a 512 MiB budget"
            for asked in ("memory_mb:600", None):  # alone over the budget: refused, never queued forever
                with pytest.raises(arcp.InvalidRequestError) as ei:
                    await client.submit(agent="echo", input=1, lease_request={LIMITS: [asked]} if asked else None)
                msg = str(ei.value)
                assert "memory_mb" in msg and "512 MiB" in msg, msg
    run(go())


def test_quotas_per_principal(make_server: type[Server], tmp_path: Path) -> None:
    cfg = tmp_path / "q.toml"
    cfg.write_text('[auth]\ntokens = { a = "alice", b = "bob" }\n'
                   '[quotas]\nmax_jobs = 1\n[quotas.principals]\nbob = 2\n')
    srv = make_server("--config", str(cfg))

    async def go() -> None:
        async with sdk_session(srv.url, token="a") as (alice, _), sdk_session(srv.url, token="b") as (bob, _):
            # long enough for the three allowed to overlap however late a loaded host starts them
            ha = [await alice.submit(agent="span", input={"seconds": 1.0}) for _ in range(3)]
            hb = [await bob.submit(agent="span", input={"seconds": 1.0}) for _ in range(4)]
            ra = await asyncio.wait_for(asyncio.gather(*(h.done for h in ha)), 30)
            rb = await asyncio.wait_for(asyncio.gather(*(h.done for h in hb)), 30)
            assert overlap([r.result for r in ra]) == 1
            assert overlap([r.result for r in rb]) == 2
            assert overlap([r.result for r in ra + rb]) == 3
    run(go())


# -- the runtime ceiling -------------------------------------------------------------------------------------

def test_the_runtime_ceiling_ends_a_job_and_is_echoed(make_server: type[Server]) -> None:
    srv = make_server("--max-runtime", "1")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            t0 = time.monotonic()
            h = await client.submit(agent="sleep", input={"seconds": 30})
            assert (h.accepted.model_extra or {})[LIMITS]["runtime_sec"] == 1
            accepted = next(f for f in rec.frames if f.get("type") == "job.accepted" and f["job_id"] == h.job_id)
            assert accepted["extensions"][LIMITS]["runtime_sec"] == 1
            with pytest.raises(arcp.TimeoutError):
                await asyncio.wait_for(h.done, 20)
            term = await rec.terminal(h.job_id)
            p = term["payload"]
            assert p["code"] == "TIMEOUT" and p["retryable"] is False, p
            assert p["message"] == "runtime limit 1 s exceeded", p
            assert p["details"] == {"limit": "runtime_sec", "value": 1}, p
            assert time.monotonic() - t0 < 20.0  # ended by the ceiling, long before its 30 s sleep
    run(go())


def test_client_runtime_limits_are_clamped_and_count_from_the_start(make_server: type[Server]) -> None:
    srv = make_server("--max-runtime", "30", "--max-jobs", "1")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            # the client's max_runtime_sec is tighter: its own message
            h = await client.submit(agent="sleep", input={"seconds": 30}, max_runtime_sec=1)
            await rec.terminal(h.job_id, timeout=10)
            assert (await rec.terminal(h.job_id))["payload"]["message"] == "job exceeded max_runtime_sec=1"
            # runtime_sec asked through the limits capability: tighter only
            h = await client.submit(agent="sleep", input={"seconds": 30}, lease_request={LIMITS: ["runtime_sec:1"]})
            assert (h.accepted.model_extra or {})[LIMITS]["runtime_sec"] == 1
            assert h.accepted.lease[LIMITS] == ["runtime_sec:1"]
            t = await rec.terminal(h.job_id, timeout=10)
            assert t["payload"]["message"] == "runtime limit 1 s exceeded", t
            h = await client.submit(agent="echo", input=1, lease_request={LIMITS: ["runtime_sec:100"]})
            assert (h.accepted.model_extra or {})[LIMITS]["runtime_sec"] == 30
            await asyncio.wait_for(h.done, 10)
            with pytest.raises(arcp.InvalidRequestError):
                await client.submit(agent="echo", input=1, lease_request={LIMITS: ["runtime_sec:0"]})
            # a job that waits longer than its max_runtime_sec still gets all of it once started
            first = await client.submit(agent="sleep", input={"seconds": 2.0})
            late = await client.submit(agent="sleep", input={"seconds": 0.3}, max_runtime_sec=1)
            assert (await asyncio.wait_for(late.done, 15)).result == {"slept": True}
            await asyncio.wait_for(first.done, 15)
    run(go())


# -- operators ---------------------------------------------------------------------------------------------

def test_admins_list_follow_and_cancel_every_principals_jobs(make_server: type[Server], tmp_path: Path) -> None:
    cfg = tmp_path / "admins.toml"
    cfg.write_text('[auth]\ntokens = { a = "alice", b = "bob", r = "root" }\nadmins = ["root"]\n')
    srv = make_server("--config", str(cfg))

    async def go() -> None:
        async with sdk_session(srv.url, token="a") as (alice, reca), \
                sdk_session(srv.url, token="b") as (bob, recb), \
                sdk_session(srv.url, token="r") as (root, recr):
            ticker = await alice.submit(agent="ticker", input={"n": 20, "interval": 0.05})
            long = await alice.submit(agent="sleep", input={"seconds": 30})
            mine = await root.submit(agent="echo", input="root's")
            await asyncio.wait_for(mine.done, 10)

            await root.list_jobs()
            entries = [f for f in recr.frames if f.get("type") == "session.jobs"][-1]["payload"]["jobs"]
            by_id = {j["job_id"]: j for j in entries}
            assert by_id[ticker.job_id]["principal"] == "alice" and by_id[long.job_id]["principal"] == "alice"
            assert by_id[mine.job_id]["principal"] == "root"
            await bob.list_jobs()
            bobs = [f for f in recb.frames if f.get("type") == "session.jobs"][-1]["payload"]["jobs"]
            assert bobs == [], "a principal that is not an admin sees only its own jobs"
            await alice.list_jobs()
            alices = [f for f in reca.frames if f.get("type") == "session.jobs"][-1]["payload"]["jobs"]
            assert {j["job_id"] for j in alices} == {ticker.job_id, long.job_id}
            assert all("principal" not in j for j in alices)

            with pytest.raises(arcp.PermissionDeniedError):
                await bob.subscribe(ticker.job_id, history=True)
            await root.subscribe(ticker.job_id, history=True)
            term = await recr.terminal(ticker.job_id, timeout=15)
            assert term["type"] == "job.result"
            ticks = [f for f in recr.frames if f.get("job_id") == ticker.job_id and f.get("type") == "job.event"
                     and f["payload"]["kind"] == "log"]
            assert len(ticks) == 20

            await bob.cancel_job(long.job_id)  # not an admin: ignored (Python flavour: silently)
            await bob.list_jobs()  # answered after the cancel: the server has read it
            assert (await listed(alice, long.job_id))[long.job_id].status == "running"
            assert not any(f.get("job_id") == long.job_id and f.get("type") == "job.cancelled" for f in reca.frames)
            await root.cancel_job(long.job_id, reason="operator stop")
            t = await reca.terminal(long.job_id, timeout=15)
            assert t["type"] == "job.error" and t["payload"]["code"] == "CANCELLED", t
            assert any(f.get("job_id") == long.job_id and f.get("type") == "job.cancelled" for f in reca.frames)

            mark = len(recr.frames)
            await root.cancel_job("job_01ARZ3NDEKTSV4RRFFQ69G5FAV")
            err = await recr.wait_for(lambda f: f.get("type") == "session.error", timeout=15, start=mark)
            assert err["payload"]["code"] == "JOB_NOT_FOUND", err
    run(go())
