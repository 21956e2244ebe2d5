"""GET /metrics, /healthz and /readyz on the WebSocket listener of a real server: figures after
jobs of every outcome (and a net.fetch job through the egress proxy), parsed with
prometheus-client's own parser; no id or principal in any label; readiness while draining."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.landlock import landlock_abi
from tests.conftest import Server
from tests.interop.client import Recorder, sdk_session
from tests.sandbox.test_egress import Origin

LIMITS = "x-vendor.arcp-supervisor.limits"
IDS = re.compile(r"(job|sess)_[0-9A-Z]{26}")


def http_get(srv: Server, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    base = srv.url.split("://", 1)[1].split("/", 1)[0]
    req = urllib.request.Request(f"http://{base}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode(errors="replace")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(srv: Server) -> tuple[Samples, str]:
    code, ctype, body = http_get(srv, "/metrics")
    assert code == 200 and ctype.startswith("text/plain"), (code, ctype, body[:300])
    out: Samples = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out, body


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def accepted_agent(rec: Recorder, job_id: str) -> str:
    f = next(f for f in rec.frames if f.get("type") == "job.accepted" and f.get("job_id") == job_id)
    return str(f["payload"]["agent"])


def test_metrics_after_jobs_of_every_outcome(make_server: type[Server]) -> None:
    srv = make_server("--token", "tok=metrics-principal")
    origin = Origin() if landlock_abi() >= 4 else None
    ids: set[str] = set()

    async def go() -> dict[str, str]:
        async with sdk_session(srv.url, token="tok") as (client, rec):
            ok = await client.submit(agent="echo", input="m")
            bad = await client.submit(agent="raises", input={})
            cancelled = await client.submit(agent="sleep", input={"seconds": 30})
            timed_out = await client.submit(agent="sleep", input={"seconds": 30}, max_runtime_sec=1)
            hog = await client.submit(agent="hog", input={"mb": 1024}, lease_request={LIMITS: ["memory_mb:128"]})
            jobs = [ok, bad, cancelled, timed_out, hog]
            await rec.wait_for(lambda f: f.get("job_id") == cancelled.job_id and f.get("type") == "job.event")
            samples, _ = await asyncio.to_thread(scrape, srv)
            assert val(samples, "arcp_sessions_active") == 1
            assert val(samples, "arcp_jobs_running") >= 1  # the sleeping ones at least
            await client.cancel_job(cancelled.job_id)
            if origin is not None:
                url = f"http://127.0.0.1:{origin.port}"
                lease = {"net.fetch": [f"{url}/**"]}
                jobs.append(await client.submit(agent="fetch", input={"url": f"{url}/big/100000"},
                                                lease_request=lease))
                jobs.append(await client.submit(agent="fetch", input={"url": "http://127.0.0.2:9/x"},
                                                lease_request=lease))
            terms = {h.job_id: await rec.terminal(h.job_id, timeout=40) for h in jobs}
            assert terms[ok.job_id]["type"] == "job.result"
            assert terms[hog.job_id]["payload"]["message"] == "memory limit 128 MiB exceeded", terms[hog.job_id]
            assert terms[timed_out.job_id]["payload"]["code"] == "TIMEOUT"
            assert terms[cancelled.job_id]["payload"]["code"] == "CANCELLED"
            if origin is not None:
                assert terms[jobs[5].job_id]["payload"]["result"]["size"] == 100000, terms[jobs[5].job_id]
                assert terms[jobs[6].job_id]["payload"]["result"]["status"] == 403, terms[jobs[6].job_id]
            ids.update(h.job_id for h in jobs)
            ids.update(str(f["session_id"]) for f in rec.frames if f.get("session_id"))
            return {name: accepted_agent(rec, h.job_id) for name, h in
                    (("echo", ok), ("raises", bad), ("sleep", cancelled), ("hog", hog))}

    try:
        agents = asyncio.run(go())
    finally:
        if origin is not None:
            origin.close()
    deadline = time.monotonic() + 10
    while True:  # the closed session is noticed by the server a moment later
        samples, body = scrape(srv)
        if val(samples, "arcp_sessions_active") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    echo, raises, sleep, hog = agents["echo"], agents["raises"], agents["sleep"], agents["hog"]
    assert "@" in echo  # the agent label is name@version
    assert val(samples, "arcp_jobs_started_total", agent=echo) == 1
    assert val(samples, "arcp_jobs_started_total", agent=sleep) == 2
    assert val(samples, "arcp_jobs_finished_total", agent=echo, outcome="success") == 1
    assert val(samples, "arcp_jobs_finished_total", agent=raises, outcome="error") == 1
    assert val(samples, "arcp_jobs_finished_total", agent=sleep, outcome="cancelled") == 1
    assert val(samples, "arcp_jobs_finished_total", agent=sleep, outcome="timeout") == 1
    assert val(samples, "arcp_jobs_finished_total", agent=hog, outcome="limit") == 1
    assert val(samples, "arcp_job_limit_kills_total", limit="memory") == 1
    for other in ("cpu", "procs", "files", "fsize", "runtime", "tmp"):
        assert (("arcp_job_limit_kills_total", (("limit", other),)) in samples
                and val(samples, "arcp_job_limit_kills_total", limit=other) == 0), other
    assert val(samples, "arcp_job_duration_seconds_count", agent=sleep) == 2
    assert val(samples, "arcp_job_duration_seconds_sum", agent=sleep) >= 1.0  # the timeout ran 1 s
    assert val(samples, "arcp_job_duration_seconds_bucket", agent=echo, le="+Inf") == 1
    assert val(samples, "arcp_jobs_running") == 0 and val(samples, "arcp_jobs_queued") == 0
    assert val(samples, "arcp_sessions_active") == 0, "the closed session still counted after 10 s"
    assert ("arcp_workers_warm", ()) in samples
    lag = samples[("arcp_event_loop_lag_seconds", ())]
    assert 0 <= lag < 5, lag  # seconds, and sane: how late the loop is on a loaded host is not the point here
    if origin is not None:
        assert val(samples, "arcp_egress_bytes_total", direction="in") >= 100000
        assert val(samples, "arcp_egress_bytes_total", direction="out") >= len("GET /big/100000 HTTP/1.1")
        assert val(samples, "arcp_egress_refused_total") == 1
    # no job id, session id or principal anywhere, labels included
    labels = {v for (_, ls) in samples for (_, v) in ls}
    assert not any(i in v for i in ids for v in labels), [v for v in labels if any(i in v for i in ids)]
    assert not IDS.search(body) and "metrics-principal" not in body


def test_health_readiness_and_other_paths(server: Server) -> None:
    assert http_get(server, "/healthz")[0] == 200
    code, _, body = http_get(server, "/readyz")
    assert code == 200 and body == "ready\n"
    code, _, body = http_get(server, "/nope?x=1")
    assert code == 404 and "/nope" in body  # as before: naming the path
    code, _, _ = http_get(server, "/arcp")  # the ARCP path without upgrade headers: websockets' answer
    assert code == 426
    code, ctype, body = http_get(server, "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert code == 200 and ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")


def test_readyz_is_503_while_draining(make_server: type[Server]) -> None:
    srv = make_server("--drain-timeout", "20")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            h = await client.submit(agent="sleep", input={"seconds": 3})
            await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event")
            assert (await asyncio.to_thread(http_get, srv, "/readyz"))[0] == 200
            os.kill(srv.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while True:
                code, _, body = await asyncio.to_thread(http_get, srv, "/readyz")
                if code != 200 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert code == 503 and body == "not ready: draining\n", (code, body)
            assert (await asyncio.to_thread(http_get, srv, "/healthz"))[0] == 200  # still serving
            samples, _ = await asyncio.to_thread(scrape, srv)
            assert val(samples, "arcp_jobs_running") == 1
            term = await rec.terminal(h.job_id, timeout=15)
            assert term["type"] == "job.result", term

    asyncio.run(go())
    assert srv.proc.wait(20) == 0, "".join(srv.stderr_lines[-30:])


@pytest.mark.parametrize("path", ["/metrics", "/healthz"])
def test_a_host_that_is_not_served_here_is_refused(server: Server, path: str) -> None:
    """The listener's Host check (against DNS rebinding) holds for the HTTP endpoints too."""
    code, _, body = http_get(server, path, {"Host": "attacker.example:80"})
    assert code == 421, (code, body)


def test_metrics_and_usage_can_be_switched_off(make_server: type[Server]) -> None:
    """--no-metrics: /metrics is 404 (health and readiness stay); --no-usage: a job's usage is
    its wall time only, its CPU, memory and tasks not measured."""
    srv = make_server("--no-metrics", "--no-usage")
    code, _, body = http_get(srv, "/metrics")
    assert code == 404 and "--no-metrics" in body
    assert http_get(srv, "/healthz")[0] == 200 and http_get(srv, "/readyz")[0] == 200

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            h = await client.submit(agent="sleep", input={"seconds": 0.3})
            term = await rec.terminal(h.job_id)
            usage = term["payload"]["x-vendor.arcp-supervisor.usage"]
            assert usage["wall_s"] >= 0.25
            assert usage["cpu_user_s"] == usage["cpu_sys_s"] == 0 and usage["memory_peak_mb"] == 0
    asyncio.run(go())


def test_usage_is_measured_by_default(make_server: type[Server]) -> None:
    srv = make_server()

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            h = await client.submit(agent="sleep", input={"seconds": 0.3})
            usage = (await rec.terminal(h.job_id))["payload"]["x-vendor.arcp-supervisor.usage"]
            assert usage["memory_peak_mb"] > 0 and usage["procs_peak"] >= 1
    asyncio.run(go())
