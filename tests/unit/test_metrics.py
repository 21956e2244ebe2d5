"""supervisor/metrics.py and supervisor/tracing.py in-process: outcome classification, the
exposition, the lag probe, and the job traces (driven through the hook functions, exported to
the SDK's in-memory exporter)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.envelope import Envelope
from shared.ids import new_id, new_trace_id, new_ulid, now_ts
from supervisor import metrics
from supervisor.core.authority import Authority
from supervisor.core.jobs import OTEL_KEY, Job

ROOT = Path(__file__).resolve().parents[2]


def make_job(agent: str = "echo@1.0.0", trace_id: str | None = None, parent: Job | None = None) -> Job:
    return Job(id=new_id("job"), principal="alice", owner_id=new_id("sess"), agent_ref=agent,
               trace_id=trace_id or (parent.trace_id if parent else new_trace_id()), created_at=now_ts(),
               lease={}, lease_constraints={}, parent_job_id=parent.id if parent else None, idempotency_key=None,
               fingerprint=None, authority=Authority({}, None), accepted={})


def end(job: Job, status: str, error: dict[str, Any] | None = None) -> None:
    """What runtime.finish does around its hooks."""
    metrics.job_ending(job)
    job.status = status
    job.terminal = {"status": status, "error": error}
    metrics.job_ended(job)


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, ctype = metrics.render(None)
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(name: str, **labels: str) -> float:
    return samples().get((name, tuple(sorted(labels.items()))), 0.0)


# -- outcomes ------------------------------------------------------------------------------------

def _err(code: str, retryable: bool = False, **details: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"code": code, "message": "m", "retryable": retryable}
    if details:
        e["details"] = details
    return e


@pytest.mark.parametrize("status,error,want", [
    ("success", None, ("success", None)),
    ("error", _err("INTERNAL_ERROR", retryable=True), ("error", None)),
    ("cancelled", _err("CANCELLED"), ("cancelled", None)),
    ("timed_out", _err("TIMEOUT"), ("timeout", None)),  # the client's max_runtime_sec
    ("error", _err("LEASE_EXPIRED"), ("error", None)),
    ("error", _err("INTERNAL_ERROR", limit="memory_mb", value=128, enforced_by="cgroup"), ("limit", "memory")),
    ("timed_out", _err("TIMEOUT", limit="cpu_sec", value=1), ("limit", "cpu")),
    ("timed_out", _err("TIMEOUT", limit="runtime_sec", value=2), ("limit", "runtime")),
    ("error", _err("INTERNAL_ERROR", limit="max_procs", value=5), ("limit", "procs")),
    ("error", _err("INTERNAL_ERROR", limit="max_open_files", value=64), ("limit", "files")),
    ("error", _err("INTERNAL_ERROR", limit="max_file_size_mb", value=1), ("limit", "fsize")),
    ("error", _err("INTERNAL_ERROR", limit="tmp_size_mb", value=1), ("limit", "tmp")),
    # a limit that could not be applied: the job never ran under it
    ("error", _err("INTERNAL_ERROR", retryable=True, limit="memory_mb", value=1, layer="cgroup"), ("error", None)),
    # an agent's own details: the outcome says limit, no label is made of its text
    ("error", _err("INTERNAL_ERROR", limit="job_0123 or anything"), ("limit", None)),
])
def test_outcome_of(status: str, error: dict[str, Any] | None, want: tuple[str, str | None]) -> None:
    assert metrics.outcome_of(status, error) == want


# -- counters and the histogram through the hooks ----------------------------------------------------

def test_hooks_count_jobs_by_agent_and_outcome_without_ids() -> None:
    agent = "counted@9.9.9"
    before = samples()
    jobs = [make_job(agent) for _ in range(4)]
    for j in jobs:
        metrics.job_accepted(j, None, None)
    for j in jobs[:3]:
        metrics.job_started(j)
        metrics.job_phase(j, "agent.run")
    time.sleep(0.02)
    end(jobs[0], "success")
    end(jobs[1], "error", _err("INTERNAL_ERROR", limit="memory_mb", value=64))
    end(jobs[2], "timed_out", _err("TIMEOUT"))
    end(jobs[3], "cancelled", _err("CANCELLED"))  # never started: not in the histogram
    after = samples()

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("arcp_jobs_started_total", agent=agent) == 3
    for outcome, n in (("success", 1), ("limit", 1), ("timeout", 1), ("cancelled", 1), ("error", 0)):
        assert delta("arcp_jobs_finished_total", agent=agent, outcome=outcome) == n, outcome
    assert delta("arcp_job_limit_kills_total", limit="memory") == 1
    assert delta("arcp_job_duration_seconds_count", agent=agent) == 3
    assert delta("arcp_job_duration_seconds_sum", agent=agent) >= 0.06
    assert delta("arcp_job_duration_seconds_bucket", agent=agent, le="+Inf") == 3
    text = metrics.render(None)[0].decode()
    for j in jobs:
        assert j.id not in text and j.owner_id not in text
    assert "alice" not in text
    assert not metrics._jobs, "per-job state outlived the job"


def test_egress_counters() -> None:
    b_in, b_out, refused = (value("arcp_egress_bytes_total", direction="in"),
                            value("arcp_egress_bytes_total", direction="out"), value("arcp_egress_refused_total"))
    metrics.egress_bytes(1000, 20)
    metrics.egress_bytes(0, 5)
    metrics.egress_refused()
    assert value("arcp_egress_bytes_total", direction="in") - b_in == 1000
    assert value("arcp_egress_bytes_total", direction="out") - b_out == 25
    assert value("arcp_egress_refused_total") - refused == 1


def test_openmetrics_when_asked() -> None:
    body, ctype = metrics.render("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


# -- the runtime's gauges and the lag probe --------------------------------------------------------

class _Admission:
    running, queued = 3, 7


class _Session:
    def __init__(self, detached: bool) -> None:
        self.detached_at = 1.0 if detached else None
        self.expired = False


class _Environments:
    ready = True
    idle = 2


class FakeRuntime:
    def __init__(self) -> None:
        self.admission = _Admission()
        self.sessions = {"a": _Session(False), "b": _Session(False), "c": _Session(True)}
        self.draining = False
        self.environments = _Environments()
        self.store = _Store()


class _Store:
    healthy = True


def test_state_gauges_readiness_and_the_lag_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    rt: Any = FakeRuntime()

    async def go() -> None:
        sampled = asyncio.Event()
        set_lag = metrics.LOOP_LAG.set

        def record(lag: float) -> None:
            set_lag(lag)
            sampled.set()
        monkeypatch.setattr(metrics.LOOP_LAG, "set", record)

        async def next_sample() -> float:
            sampled.clear()
            await asyncio.wait_for(sampled.wait(), metrics.LAG_INTERVAL + 10)
            return value("arcp_event_loop_lag_seconds")

        metrics.attach(rt)
        try:
            async with anyio.create_task_group() as tg:  # as the runtime runs it: in its task group
                tg.start_soon(metrics.probe_lag)
                assert value("arcp_jobs_running") == 3 and value("arcp_jobs_queued") == 7
                assert value("arcp_sessions_active") == 2 and value("arcp_workers_warm") == 2
                assert 0 <= await next_sample() < 0.3  # an idle loop wakes on time
                # The probe went back to sleep as it took that sample: block the loop through its
                # wake-up, 0.6 s past it.
                time.sleep(metrics.LAG_INTERVAL + 0.6)
                assert await next_sample() >= 0.5
                assert metrics.readiness(rt) is None
                rt.store.healthy = False
                assert metrics.readiness(rt) == "the state store cannot write (see the log)"
                rt.store.healthy = True
                rt.environments.ready = False
                assert metrics.readiness(rt) == "a fork server is not running"
                rt.draining = True
                assert metrics.readiness(rt) == "draining"
                tg.cancel_scope.cancel()
        finally:
            metrics.detach(rt)
        assert not [t for t in asyncio.all_tasks() if "probe_lag" in repr(t.get_coro())], \
            "the lag probe outlived its task group"
        assert value("arcp_jobs_running") == 0  # a closed runtime is no longer read

    asyncio.run(go())


# -- traces ---------------------------------------------------------------------------------------

@pytest.fixture()
def spans() -> Iterator[Any]:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert metrics.use_tracer_provider(provider)
    yield exporter
    metrics.use_tracer_provider(None)


def _by_name(exporter: Any) -> dict[str, Any]:
    return {s.name: s for s in exporter.get_finished_spans()}


def test_a_job_span_in_the_jobs_trace_with_its_steps(spans: Any) -> None:
    job = make_job()
    env = Envelope(type="job.submit", id=new_ulid(), payload={})
    metrics.job_accepted(job, env, None)
    metrics.job_started(job)
    metrics.job_phase(job, "agent.run")
    end(job, "success")
    got = _by_name(spans)
    assert set(got) == {"arcp.job", "arcp.worker.start", "arcp.agent.run", "arcp.job.terminal"}
    root = got["arcp.job"]
    assert root.parent is None
    assert f"{root.context.trace_id:032x}" == job.trace_id
    assert root.attributes["arcp.job_id"] == job.id and root.attributes["arcp.outcome"] == "success"
    steps = [got[n] for n in ("arcp.worker.start", "arcp.agent.run", "arcp.job.terminal")]
    for s in steps:
        assert s.parent.span_id == root.context.span_id and s.context.trace_id == root.context.trace_id
    assert steps[0].end_time <= steps[1].start_time and steps[1].end_time <= steps[2].start_time
    assert root.start_time <= steps[0].start_time and steps[2].end_time <= root.end_time


@pytest.mark.parametrize("where", ["trace_id", "extension"])
def test_a_traceparent_of_the_submit_is_the_parent(spans: Any, where: str) -> None:
    trace, parent_span = new_trace_id(), "00f067aa0ba902b7"
    tp = f"00-{trace}-{parent_span}-01"
    env = Envelope(type="job.submit", id=new_ulid(), payload={}, trace_id=tp if where == "trace_id" else None,
                   extensions={OTEL_KEY: {"traceparent": tp}} if where == "extension" else {})
    job = make_job(trace_id=trace)
    metrics.job_accepted(job, env, None)
    end(job, "error", _err("INTERNAL_ERROR", limit="memory_mb", value=1))
    root = _by_name(spans)["arcp.job"]
    assert f"{root.context.trace_id:032x}" == trace
    assert root.parent is not None and root.parent.is_remote and f"{root.parent.span_id:016x}" == parent_span
    assert root.status.status_code.name == "ERROR" and root.attributes["arcp.outcome"] == "limit"


def test_a_traceparent_of_another_trace_is_not_taken(spans: Any) -> None:
    job = make_job()
    env = Envelope(type="job.submit", id=new_ulid(), payload={}, trace_id=job.trace_id,
                   extensions={OTEL_KEY: {"traceparent": f"00-{new_trace_id()}-00f067aa0ba902b7-01"}})
    metrics.job_accepted(job, env, None)
    end(job, "cancelled", _err("CANCELLED"))
    root = _by_name(spans)["arcp.job"]
    assert root.parent is None and f"{root.context.trace_id:032x}" == job.trace_id


def test_a_delegated_childs_span_is_under_its_parents(spans: Any) -> None:
    parent = make_job()
    metrics.job_accepted(parent, None, None)
    child = make_job(agent="other@1.0.0", parent=parent)
    metrics.job_accepted(child, Envelope(type="job.submit", id=new_ulid(), payload={}, trace_id=parent.trace_id),
                         parent)
    end(child, "success")
    end(parent, "success")
    roots = [s for s in spans.get_finished_spans() if s.name == "arcp.job"]
    c = next(s for s in roots if s.attributes["arcp.job_id"] == child.id)
    p = next(s for s in roots if s.attributes["arcp.job_id"] == parent.id)
    assert c.parent.span_id == p.context.span_id and c.context.trace_id == p.context.trace_id
    assert c.attributes["arcp.parent_job_id"] == parent.id


def test_no_spans_once_tracing_is_off(spans: Any) -> None:
    metrics.use_tracer_provider(None)
    job = make_job()
    metrics.job_accepted(job, None, None)
    metrics.job_started(job)
    end(job, "success")
    assert not spans.get_finished_spans()


def test_without_the_sdk_tracing_is_off_and_the_hooks_work() -> None:
    """opentelemetry-sdk not importable (the API alone may be, as here): no tracing, even with
    OTEL_TRACES_EXPORTER set; the hooks count as usual."""
    code = """
import sys
sys.modules["opentelemetry.sdk"] = None
from supervisor import metrics
from tests.unit.test_metrics import end, make_job
assert not metrics.configure_tracing_from_env()
assert not metrics.tracing_available()
job = make_job()
metrics.job_accepted(job, None, None)
metrics.job_started(job)
end(job, "success")
assert 'outcome="success"' in metrics.render(None)[0].decode()
print("ok")
"""
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_nothing_of_opentelemetry_is_imported_unless_asked() -> None:
    code = """
import sys
from supervisor import metrics
assert not metrics.configure_tracing_from_env()
assert not [m for m in sys.modules if m.startswith("opentelemetry")], sorted(sys.modules)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_the_environment_sets_up_an_exporter() -> None:
    """OTEL_TRACES_EXPORTER=console: a provider is made at start and a job's spans are written."""
    pytest.importorskip("opentelemetry.sdk")
    code = """
from supervisor import metrics
from tests.unit.test_metrics import end, make_job
assert metrics.configure_tracing_from_env()
job = make_job()
metrics.job_accepted(job, None, None)
end(job, "success")
from opentelemetry import trace
trace.get_tracer_provider().force_flush()
print("trace", job.trace_id)
"""
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "console"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    trace_id = p.stdout.strip().splitlines()[-1].split()[1]
    assert '"name": "arcp.job"' in p.stdout and f"0x{trace_id}" in p.stdout, p.stdout[-2000:]
