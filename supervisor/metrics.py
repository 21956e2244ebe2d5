"""Operating figures: Prometheus metrics, health and readiness, and one trace per job.

Metrics live in a registry of their own (`REGISTRY`, not prometheus-client's global one)
and are served as `GET /metrics` on the WebSocket listener (transport_ws). Besides ours it
holds prometheus-client's process collector (CPU, resident memory, open descriptors of the
supervisor process) and its platform collector (`python_info`); no other collector.

Counters and the duration histogram are fed by the hook functions below, one call where
the event happens (runtime, job_runner, egress). The gauges that mirror state (jobs
running and queued, sessions, warm workers) are read from the runtime at scrape time
(`_StateCollector`), so they cannot drift. `arcp_event_loop_lag_seconds` is measured: a
task sleeps `LAG_INTERVAL` and records how late it woke; it lives from the runtime's start
to its close.

Labels are bounded: `agent` is the registered `name@version`, `outcome`, `limit` and
`direction` are fixed sets. No label carries a job id, session id or principal.

Traces, where `opentelemetry-sdk` is installed (the `otel` extra) and configured (a global
SDK tracer provider already set, or `OTEL_TRACES_EXPORTER` / `OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` in the environment): one span per job, `arcp.job`, from
its acceptance to its terminal, with the children `arcp.worker.start` (admitted until the
job is handed to its worker), `arcp.agent.run` (until the worker's outcome) and
`arcp.job.terminal` (sending and storing the terminal). The job span is in the trace of the
job's `trace_id`; a W3C traceparent of the same trace on the submit (as its `trace_id`, or in
the `x-vendor.opentelemetry.tracecontext` extension) is its parent, and a delegated child's
parent is its parent job's span. The SDK is imported only when tracing is asked for (and
its absence is found once); untraced, every tracing step is a test of `_tracer is None`.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from prometheus_client import (
    CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector, disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from shared.ids import TRACEPARENT_RE
from supervisor.core import usage
from supervisor.core.jobs import OTEL_KEY

if TYPE_CHECKING:
    from shared.envelope import Envelope
    from supervisor.core.jobs import Job


class Scraped(Protocol):
    """What the scrape-time gauges and /readyz read of a running runtime."""

    @property
    def draining(self) -> bool: ...

    admission: Any  # .running, .queued
    sessions: dict[str, Any]  # values: .detached_at, .expired
    pool: Any  # .idle
    fork_server: Any  # .ready
    store: Any  # .healthy

log = logging.getLogger("arcp.metrics")

LAG_INTERVAL = 0.5  # seconds the lag probe sleeps between samples
OUTCOMES = ("success", "error", "cancelled", "timeout", "limit")
# The limit key of an error's details (supervisor and worker) -> the `limit` label.
LIMIT_LABELS = {"memory_mb": "memory", "cpu_sec": "cpu", "max_procs": "procs", "max_open_files": "files",
                "max_file_size_mb": "fsize", "runtime_sec": "runtime", "tmp_size_mb": "tmp"}
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                    float("inf"))

disable_created_metrics()  # no `*_created` series beside every counter and histogram
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

JOBS_STARTED = Counter("arcp_jobs_started_total", "Jobs started (admitted to run), per agent.",
                       ["agent"], registry=REGISTRY)
JOBS_FINISHED = Counter("arcp_jobs_finished_total",
                        "Jobs that reached their terminal, per agent and outcome (success, error, cancelled, "
                        "timeout, limit: ended by one of the job's resource limits).",
                        ["agent", "outcome"], registry=REGISTRY)
JOB_DURATION = Histogram("arcp_job_duration_seconds",
                         "Seconds from a job's start (admission) to its terminal; jobs that ended while queued "
                         "are not counted.", ["agent"], buckets=DURATION_BUCKETS, registry=REGISTRY)
LIMIT_KILLS = Counter("arcp_job_limit_kills_total", "Jobs ended by one of their resource limits, per limit.",
                      ["limit"], registry=REGISTRY)
EGRESS_BYTES = Counter("arcp_egress_bytes_total",
                       "Bytes relayed by the egress proxy: in = from the network to jobs, out = from jobs.",
                       ["direction"], registry=REGISTRY)
EGRESS_REFUSED = Counter("arcp_egress_refused_total",
                         "Egress requests refused: outside the job's lease (403) or over a connection cap (429).",
                         registry=REGISTRY)
LOOP_LAG = Gauge("arcp_event_loop_lag_seconds",
                 f"How late the supervisor's event loop woke from a {LAG_INTERVAL} s sleep (last sample).",
                 registry=REGISTRY)
for _name in LIMIT_LABELS.values():
    LIMIT_KILLS.labels(_name)
_EGRESS_IN, _EGRESS_OUT = EGRESS_BYTES.labels("in"), EGRESS_BYTES.labels("out")


class _StateCollector:
    """The gauges that mirror the state of the running runtime(s), read at scrape time."""

    def collect(self) -> Iterable[Metric]:
        rts = [a.rt for a in _attached.values()]
        yield GaugeMetricFamily("arcp_jobs_running", "Jobs running now (admitted, no terminal yet).",
                                value=sum(rt.admission.running for rt in rts))
        yield GaugeMetricFamily("arcp_jobs_queued", "Jobs accepted and waiting for admission.",
                                value=sum(rt.admission.queued for rt in rts))
        yield GaugeMetricFamily("arcp_sessions_active", "Sessions with a connected client.",
                                value=sum(1 for rt in rts for s in rt.sessions.values()
                                          if s.detached_at is None and not s.expired))
        yield GaugeMetricFamily("arcp_workers_warm", "Idle workers ready for a job (fresh, or kept for reuse).",
                                value=sum(rt.pool.idle for rt in rts))


@dataclass
class _Attached:
    rt: Scraped


_attached: dict[int, _Attached] = {}
REGISTRY.register(_StateCollector())


def attach(rt: Scraped) -> None:
    """The runtime has started: its state is scraped and tracing is set up from the
    environment (once). The runtime runs `probe_lag` in its task group."""
    if id(rt) not in _attached:
        _attached[id(rt)] = _Attached(rt)
    configure_tracing_from_env()


def detach(rt: Scraped) -> None:
    """The runtime closes: its state is no longer scraped."""
    _attached.pop(id(rt), None)


async def probe_lag() -> None:
    """Measure the event loop's lag: sleep LAG_INTERVAL, record how late the wake-up was."""
    while True:
        t0 = time.monotonic()
        await anyio.sleep(LAG_INTERVAL)
        LOOP_LAG.set(max(0.0, time.monotonic() - t0 - LAG_INTERVAL))


def render(accept: str | None) -> tuple[bytes, str]:
    """The exposition (Prometheus text, or OpenMetrics if the scraper asks for it) and its type."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY), content_type


def readiness(rt: Scraped) -> str | None:
    """None when the server takes new work, else why not."""
    if rt.draining:
        return "draining"
    if not rt.fork_server.ready:
        return "the fork server is not running"
    if not rt.store.healthy:
        return "the state store cannot write (see the log)"
    return None


# -- jobs ------------------------------------------------------------------------------------

@dataclass
class _JobState:
    started: float | None = None  # monotonic, at admission
    span: Any = None  # the job's span (tracing on)
    phase: Any = None  # its current child span


_jobs: weakref.WeakKeyDictionary[Job, _JobState] = weakref.WeakKeyDictionary()


def outcome_of(status: str, error: dict[str, Any] | None) -> tuple[str, str | None]:
    """(outcome label, limit label or None) of a job's terminal status and error: the outcome
    as the usage record names it, and for a limit, which one."""
    outcome = usage.outcome_of(status, error)
    if outcome != "limit":
        return outcome, None
    details = (error or {}).get("details") or {}
    return outcome, LIMIT_LABELS.get(str(details.get("limit")))


def job_accepted(job: Job, env: Envelope | None, parent: Job | None) -> None:
    """A job was accepted (submitted, or delegated by `parent`): its span opens."""
    if _tracer is None:
        return
    _jobs[job] = _JobState(span=_start_job_span(job, env, parent))


def job_started(job: Job) -> None:
    """Admitted: it counts as started; its worker is being made ready."""
    JOBS_STARTED.labels(job.agent_ref).inc()
    st = _jobs.get(job)
    if st is None:
        st = _jobs[job] = _JobState()
    st.started = _now()
    if st.span is not None:
        _phase(st, "arcp.worker.start")


def job_phase(job: Job, name: str) -> None:
    """The job's next step (`agent.run`): the current child span ends, this one begins."""
    st = _jobs.get(job)
    if st is not None and st.span is not None:
        _phase(st, f"arcp.{name}")


def job_ending(job: Job) -> None:
    """Its terminal is decided and about to be sent."""
    st = _jobs.get(job)
    if st is not None and st.span is not None:
        _phase(st, "arcp.job.terminal")


def job_ended(job: Job) -> None:
    """Its terminal went out: count it, and close its spans."""
    terminal = job.terminal or {}
    outcome, limit = outcome_of(job.status, terminal.get("error"))
    JOBS_FINISHED.labels(job.agent_ref, outcome).inc()
    if limit is not None:
        LIMIT_KILLS.labels(limit).inc()
    st = _jobs.pop(job, None)
    if st is None:
        return
    if st.started is not None:
        JOB_DURATION.labels(job.agent_ref).observe(_now() - st.started)
    if st.span is not None:
        _end_job_span(st, job, outcome, terminal.get("error"))


def _now() -> float:
    return time.monotonic()


# -- egress ----------------------------------------------------------------------------------

def egress_bytes(inbound: int, outbound: int) -> None:
    if inbound:
        _EGRESS_IN.inc(inbound)
    if outbound:
        _EGRESS_OUT.inc(outbound)


def egress_refused() -> None:
    EGRESS_REFUSED.inc()


# -- tracing (opentelemetry-sdk, optional) -------------------------------------------------------

_tracer: Any = None  # an SDK tracer while jobs are traced, else None
_configured = False
_preset_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar("arcp_trace_id", default=None)


class _Otel:
    """The opentelemetry pieces tracing uses: imported when tracing is asked for, never before
    (the SDK's import is a tenth of a second and thousands of objects)."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.trace = trace
        self.Context = Context
        self.TracerProvider = TracerProvider
        self.RandomIdGenerator = RandomIdGenerator
        self.propagator = TraceContextTextMapPropagator()

        class JobTraceIds(IdGenerator):
            """The provider's id generator, except that a root span opened for a job takes the
            job's trace id (set for the call in `_preset_trace_id`)."""

            def __init__(self, inner: IdGenerator) -> None:
                self.inner = inner

            def generate_span_id(self) -> int:
                return self.inner.generate_span_id()

            def generate_trace_id(self) -> int:
                preset = _preset_trace_id.get()
                return preset if preset is not None else self.inner.generate_trace_id()

            def is_trace_id_random(self) -> bool:
                if _preset_trace_id.get() is not None:
                    return False  # a client's, or ours: not promised random by the W3C rules
                f = getattr(self.inner, "is_trace_id_random", None)
                return bool(f()) if f is not None else False

        self.JobTraceIds = JobTraceIds


_otel: _Otel | None = None
_otel_missing = False  # the import failed once: not tried again


def _load_otel() -> _Otel | None:
    global _otel, _otel_missing
    if _otel is None and not _otel_missing:
        try:
            _otel = _Otel()
        except ImportError:
            _otel_missing = True
    return _otel


def tracing_available() -> bool:
    """Is opentelemetry-sdk importable?"""
    return _load_otel() is not None


def use_tracer_provider(provider: Any) -> bool:
    """Trace jobs to `provider` (an SDK TracerProvider) from now on; None: stop tracing.
    False if the SDK is not installed or `provider` is not one of its providers."""
    global _tracer, _configured
    _configured = True
    _tracer = None
    o = _load_otel() if provider is not None else None
    if o is None or not isinstance(provider, o.TracerProvider):
        return False
    if not isinstance(provider.id_generator, o.JobTraceIds):
        provider.id_generator = o.JobTraceIds(provider.id_generator)  # type: ignore[assignment]  # (typed as the default)
    from supervisor import __version__
    _tracer = provider.get_tracer("arcp-supervisor", __version__)
    return True


def configure_tracing_from_env() -> bool:
    """Once: adopt a global SDK tracer provider if one is set (opentelemetry-instrument, an
    embedding program), else make one when the environment asks for export (the exporters
    named by OTEL_TRACES_EXPORTER, default otlp, found like the SDK's own configuration does,
    each reading its own OTEL_EXPORTER_* settings). Nothing is imported unless one of the two
    may apply. True if jobs are traced."""
    global _configured
    if _configured:
        return _tracer is not None
    _configured = True
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    endpoint = any(os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    export = names.lower() != "none" and bool(names or endpoint)
    if not export and "opentelemetry.trace" not in sys.modules:  # no one can have set a provider
        return False
    o = _load_otel()
    if o is None:
        if export:
            log.warning("OTEL_* asks for traces, but opentelemetry-sdk is not installed "
                        "(pip install 'arcp-supervisor[otel]'): jobs are not traced")
        return False
    current = o.trace.get_tracer_provider()
    if isinstance(current, o.TracerProvider):
        return use_tracer_provider(current)
    if not export:
        return False
    provider = _provider_from_env(o, [n.strip() for n in (names or "otlp").split(",") if n.strip()])
    if provider is None:
        return False
    o.trace.set_tracer_provider(provider)
    return use_tracer_provider(provider)


def _provider_from_env(o: _Otel, names: list[str]) -> Any:
    from importlib.metadata import entry_points

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = o.TracerProvider(resource=Resource.create({"service.name": "arcp-supervisor"}),
                                id_generator=o.JobTraceIds(o.RandomIdGenerator()))
    added = 0
    for name in names:
        found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not found:
            log.error("OTEL_TRACES_EXPORTER names %r, which is not installed (pip install "
                      "'arcp-supervisor[otel]' for otlp): no traces go there", name)
            continue
        try:
            exporter = found[0].load()()
        except Exception as e:  # a third-party exporter's set-up: any failure leaves it out
            log.error("trace exporter %r could not be set up: %s", name, e)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
        added += 1
    if not added:
        return None
    log.info("tracing jobs to %s", ", ".join(names))
    return provider


def _start_job_span(job: Job, env: Envelope | None, parent: Job | None) -> Any:
    o = _otel
    assert o is not None
    ctx: Any = None
    pst = _jobs.get(parent) if parent is not None else None
    if pst is not None and pst.span is not None and parent is not None and parent.trace_id == job.trace_id:
        ctx = o.trace.set_span_in_context(pst.span, o.Context())
    elif env is not None:
        otel = env.extensions.get(OTEL_KEY)
        for tp in (env.trace_id, otel.get("traceparent") if isinstance(otel, dict) else None):
            if isinstance(tp, str) and (m := TRACEPARENT_RE.match(tp.strip().lower())) and m.group(1) == job.trace_id:
                ctx = o.propagator.extract({"traceparent": tp.strip().lower()}, context=o.Context())
                break
    attrs = {"arcp.job_id": job.id, "arcp.agent": job.agent_ref}
    if job.parent_job_id:
        attrs["arcp.parent_job_id"] = job.parent_job_id
    token = _preset_trace_id.set(int(job.trace_id, 16))
    try:
        return _tracer.start_span("arcp.job", context=ctx if ctx is not None else o.Context(),
                                  kind=o.trace.SpanKind.SERVER, attributes=attrs)
    finally:
        _preset_trace_id.reset(token)


def _phase(st: _JobState, name: str) -> None:
    o = _otel
    assert o is not None
    if st.phase is not None:
        st.phase.end()
    st.phase = _tracer.start_span(name, context=o.trace.set_span_in_context(st.span, o.Context()))


def _end_job_span(st: _JobState, job: Job, outcome: str, error: dict[str, Any] | None) -> None:
    o = _otel
    assert o is not None
    if st.phase is not None:
        st.phase.end()
        st.phase = None
    span = st.span
    span.set_attribute("arcp.outcome", outcome)
    span.set_attribute("arcp.status", job.status)
    if error is not None:
        span.set_attribute("arcp.error.code", str(error.get("code")))
        if outcome in ("error", "timeout", "limit"):
            span.set_status(o.trace.Status(o.trace.StatusCode.ERROR, str(error.get("code"))))
    span.end()
