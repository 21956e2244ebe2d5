"""Operating figures: Prometheus metrics, health and readiness, and the job hooks that also
drive the job traces.

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

Traces (opentelemetry, optional) are supervisor/tracing.py's: the job hooks below drive them
too, and `attach` sets them up from the environment.
"""

from __future__ import annotations

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

from supervisor import tracing
from supervisor.core import usage
# The tracing switches, here too for whoever drives the operating figures as a whole.
from supervisor.tracing import configure_tracing_from_env as configure_tracing_from_env
from supervisor.tracing import tracing_available as tracing_available
from supervisor.tracing import use_tracer_provider as use_tracer_provider

if TYPE_CHECKING:
    from shared.envelope import Envelope
    from supervisor.core.jobs import Job


class Scraped(Protocol):
    """What the scrape-time gauges and /readyz read of a running runtime."""

    @property
    def draining(self) -> bool: ...

    admission: Any  # .running, .queued
    sessions: dict[str, Any]  # values: .detached_at, .expired
    environments: Any  # .idle, .ready (every agent environment's workers)
    store: Any  # .healthy


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
                                value=sum(rt.environments.idle for rt in rts))


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
    if not rt.environments.ready:
        return "a fork server is not running"
    if not rt.store.healthy:
        return "the state store cannot write (see the log)"
    return None


# -- jobs ------------------------------------------------------------------------------------

_jobs: weakref.WeakKeyDictionary[Job, float] = weakref.WeakKeyDictionary()  # job -> when it started (monotonic)
_enabled = True


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
    tracing.job_accepted(job, env, parent)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, kept: the label sets are few (agents, outcomes, limits) and
    prometheus-client's lookup costs a lock and a tuple per call."""
    key = (id(metric), labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def set_enabled(on: bool) -> None:
    """`--no-metrics`: the counters are not kept (and /metrics answers 404); tracing goes on."""
    global _enabled
    _enabled = on


def enabled() -> bool:
    return _enabled


def job_started(job: Job) -> None:
    """Admitted: it counts as started; its worker is being made ready."""
    if _enabled:
        _child(JOBS_STARTED, job.agent_ref).inc()
        _jobs[job] = _now()
    tracing.job_phase(job, "arcp.worker.start")


def job_phase(job: Job, name: str) -> None:
    """The job's next step (`agent.run`): the current child span ends, this one begins."""
    tracing.job_phase(job, f"arcp.{name}")


def job_ending(job: Job) -> None:
    """Its terminal is decided and about to be sent."""
    tracing.job_phase(job, "arcp.job.terminal")


def job_ended(job: Job) -> None:
    """Its terminal went out: count it, and close its spans."""
    terminal = job.terminal or {}
    outcome, limit = outcome_of(job.status, terminal.get("error"))
    if _enabled:
        _child(JOBS_FINISHED, job.agent_ref, outcome).inc()
        if limit is not None:
            _child(LIMIT_KILLS, limit).inc()
        started = _jobs.pop(job, None)
        if started is not None:
            _child(JOB_DURATION, job.agent_ref).observe(_now() - started)
    tracing.job_ended(job, outcome, terminal.get("error"))


def _now() -> float:
    return time.monotonic()


# -- egress ----------------------------------------------------------------------------------

def egress_bytes(inbound: int, outbound: int) -> None:
    if not _enabled:
        return
    if inbound:
        _EGRESS_IN.inc(inbound)
    if outbound:
        _EGRESS_OUT.inc(outbound)


def egress_refused() -> None:
    if _enabled:
        EGRESS_REFUSED.inc()
