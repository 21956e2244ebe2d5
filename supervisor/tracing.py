"""Job traces, where `opentelemetry-sdk` is installed (the `otel` extra) and configured (a
global SDK tracer provider already set, or `OTEL_TRACES_EXPORTER` /
`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` in the environment).

One span per job, `arcp.job`, from its acceptance to its terminal, with the children
`arcp.worker.start` (admitted until the job is handed to its worker), `arcp.agent.run`
(until the worker's outcome) and `arcp.job.terminal` (sending and storing the terminal). The
job span is in the trace of the job's `trace_id`; a W3C traceparent of the same trace on the
submit (as its `trace_id`, or in the `x-vendor.opentelemetry.tracecontext` extension) is its
parent, and a delegated child's parent is its parent job's span. The SDK is imported only
when tracing is asked for (and its absence is found once); untraced, every tracing step is a
test of `_tracer is None` or a lookup that finds no spans.

The steps are driven by the job hooks of supervisor/metrics.py, which runtime, job_runner
and the others call.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.ids import TRACEPARENT_RE
from supervisor.core.jobs import OTEL_KEY

if TYPE_CHECKING:
    from shared.envelope import Envelope
    from supervisor.core.jobs import Job

log = logging.getLogger("arcp.metrics")  # the logger of the operating figures, traces included

# -- the SDK and the tracer ----------------------------------------------------------------

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


# -- a job's spans ---------------------------------------------------------------------------

@dataclass
class _JobSpans:
    span: Any  # the job's span
    phase: Any = None  # its current child span


_jobs: weakref.WeakKeyDictionary[Job, _JobSpans] = weakref.WeakKeyDictionary()


def job_accepted(job: Job, env: Envelope | None, parent: Job | None) -> None:
    """A job was accepted (submitted, or delegated by `parent`): its span opens if jobs are traced."""
    if _tracer is None:
        return
    _jobs[job] = _JobSpans(span=_start_job_span(job, env, parent))


def job_phase(job: Job, name: str) -> None:
    """The job's next step (the span `name`): the current child span ends, this one begins."""
    st = _jobs.get(job)
    if st is not None and st.span is not None:
        _phase(st, name)


def job_ended(job: Job, outcome: str, error: dict[str, Any] | None) -> None:
    """Its terminal went out: its spans end."""
    st = _jobs.pop(job, None)
    if st is not None and st.span is not None:
        _end_job_span(st, job, outcome, error)


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


def _phase(st: _JobSpans, name: str) -> None:
    o = _otel
    assert o is not None
    if st.phase is not None:
        st.phase.end()
    st.phase = _tracer.start_span(name, context=o.trace.set_span_in_context(st.span, o.Context()))


def _end_job_span(st: _JobSpans, job: Job, outcome: str, error: dict[str, Any] | None) -> None:
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
