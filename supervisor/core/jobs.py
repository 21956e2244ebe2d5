"""Jobs: submit validation, idempotency, records and the per-job lifecycle state.

Validation follows protocol.md §6.1 (Go's order, with our additions before
idempotency). Everything here is pure; the worker I/O lives in job_runner.py.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from shared.envelope import Envelope
from shared.errors import DuplicateKey, InvalidRequest
from shared.ids import format_dt, new_id, new_trace_id, now_ts, parse_trace_id, parse_ts
from shared.lease import LeaseError, validate_lease_request
from shared.messages import PENDING, TERMINAL_STATUSES
from supervisor.core.authority import Authority
from supervisor.config import AgentSpec, Limits
from supervisor.core.limits import LIMITS_KEY, SANDBOX_KEY, effective_limits, requested_limits
from supervisor.core.registry import AgentRegistry

if TYPE_CHECKING:
    from supervisor.core.session import Session

MAX_RUNTIME_SEC = 7 * 86400
MAX_IDEMPOTENCY_KEY = 256
OTEL_KEY = "x-vendor.opentelemetry.tracecontext"


@dataclass
class SubmitRequest:
    """A validated job.submit."""

    agent: AgentSpec
    agent_sent: str
    input: Any
    lease: dict[str, list[str]]
    lease_constraints: dict[str, Any]
    expires_at: float | None
    idempotency_key: str | None
    max_runtime_sec: int | None
    trace_id: str
    limits: Limits
    asked_limits: dict[str, int]
    parent_job_id: str | None
    delegate_id: str | None

    def fingerprint(self) -> bytes:
        """What "same parameters" means for idempotency (trace id excluded)."""
        return orjson.dumps(
            {"agent": self.agent_sent, "input": self.input, "lease": self.lease,
             "lease_constraints": self.lease_constraints, "max_runtime_sec": self.max_runtime_sec,
             "parent_job_id": self.parent_job_id, "limits": self.asked_limits},
            option=orjson.OPT_SORT_KEYS,
        )


def parse_submit(env: Envelope, registry: AgentRegistry, now: float) -> SubmitRequest:
    p = env.payload
    if "agent" not in p:
        raise InvalidRequest("job.submit payload has no 'agent'")
    spec = registry.resolve(p["agent"])
    constraints = p.get("lease_constraints") or {}
    if not isinstance(constraints, dict):
        raise InvalidRequest("job.submit field 'lease_constraints' must be an object")
    expires_at = None
    norm_constraints: dict[str, Any] = {}
    if "expires_at" in constraints and constraints["expires_at"] is not None:
        raw = constraints["expires_at"]
        try:
            dt = parse_ts(raw)
        except ValueError as e:
            raise InvalidRequest(f"lease_constraints.expires_at {raw!r} is not an RFC 3339 timestamp") from e
        if dt.utcoffset() is None or (isinstance(raw, str) and not raw.rstrip().endswith(("Z", "z", "+00:00"))):
            raise InvalidRequest(f"lease_constraints.expires_at {raw!r} must be in UTC (Z or +00:00)")
        if dt.timestamp() <= now:
            raise InvalidRequest(f"lease_constraints.expires_at {raw!r} is not in the future")
        expires_at = dt.timestamp()
        norm_constraints["expires_at"] = format_dt(dt)
    try:
        lease = validate_lease_request(p.get("lease_request"))
    except LeaseError as e:
        raise InvalidRequest(str(e)) from e
    mrs = p.get("max_runtime_sec")
    if mrs is not None:
        if isinstance(mrs, bool) or not isinstance(mrs, int) or mrs < 0:
            raise InvalidRequest(f"job.submit field 'max_runtime_sec' must be an integer >= 0, got {mrs!r}")
        if mrs > MAX_RUNTIME_SEC:
            raise InvalidRequest(f"job.submit field 'max_runtime_sec' is over {MAX_RUNTIME_SEC}")
        mrs = mrs or None
    key = p.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY):
        raise InvalidRequest(f"job.submit field 'idempotency_key' must be a string of 1..{MAX_IDEMPOTENCY_KEY} characters")
    trace_id = _trace_of(env)
    asked = requested_limits(env.extensions, lease)
    limits = effective_limits(spec.limits, asked)
    parent, delegate = p.get("parent_job_id"), p.get("delegate_id")
    for name, v in (("parent_job_id", parent), ("delegate_id", delegate)):
        if v is not None and not isinstance(v, str):
            raise InvalidRequest(f"job.submit field '{name}' must be a string")
    return SubmitRequest(
        agent=spec, agent_sent=p["agent"], input=p.get("input"), lease=lease,
        lease_constraints=norm_constraints, expires_at=expires_at, idempotency_key=key,
        max_runtime_sec=mrs, trace_id=trace_id, limits=limits, asked_limits=asked,
        parent_job_id=parent, delegate_id=delegate,
    )


def _trace_of(env: Envelope) -> str:
    if env.trace_id is not None:
        try:
            return parse_trace_id(env.trace_id)
        except ValueError as e:
            raise InvalidRequest(f"envelope field 'trace_id': {e}") from e
    otel = env.extensions.get(OTEL_KEY)
    if isinstance(otel, dict) and isinstance(otel.get("traceparent"), str):
        try:
            return parse_trace_id(otel["traceparent"])
        except ValueError:
            pass
    return new_trace_id()


@dataclass(eq=False)
class Watch:
    """A session that follows a job it did not submit (subscribe, or an idempotent replay).

    While `pending` is a list the watch is still being given the job's history:
    live frames wait there so that they follow the history in order.
    """

    session: Session
    pending: list[tuple[str, dict[str, Any]]] | None = None


@dataclass(eq=False)
class Job:
    id: str
    principal: str
    owner_id: str
    agent_ref: str
    trace_id: str
    created_at: str
    lease: dict[str, list[str]]
    lease_constraints: dict[str, Any]
    parent_job_id: str | None
    idempotency_key: str | None
    fingerprint: bytes | None
    authority: Authority
    accepted: dict[str, Any]  # the job.accepted payload without request_id and budget
    status: str = PENDING
    request: SubmitRequest | None = None  # None for a job restored from the store
    owner: Session | None = None  # the submitting session, while it exists
    terminal: dict[str, Any] | None = None  # the terminal outcome, for replays
    watchers: list[Watch] = field(default_factory=list)
    runner: Any = None  # the JobRunner driving it
    created_mono: float = field(default_factory=time.monotonic)
    finished_mono: float | None = None
    last_seq: int = 0  # the highest event_seq this job took in its submitting session
    tmp_dir: str | None = None  # the job's private HOME/TMPDIR: its worker's, emptied at its terminal
    tmp_capped: bool = False  # a tmpfs of its own, capped at tmp_size bytes
    tmp_size: int | None = None
    children: list[str] = field(default_factory=list)  # delegated jobs, ended with this one
    credentials: list[dict[str, Any]] = field(default_factory=list)  # provisioned; revoked at the end

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def accepted_payload(self, flavour: str, request_id: str) -> dict[str, Any]:
        from supervisor.core.frames import budget_wire

        p = dict(self.accepted)
        if self.authority.initial:
            p["budget"] = budget_wire(self.authority.initial, flavour)
        if self.credentials:  # never stored with the record: they die with the job
            p["credentials"] = self.credentials
        p["request_id"] = request_id
        return p

    def accepted_extensions(self) -> dict[str, Any]:
        """The job.accepted envelope's extensions: the effective limits and the sandbox layers,
        as in the payload."""
        return {k: self.accepted[k] for k in (LIMITS_KEY, SANDBOX_KEY) if k in self.accepted}

    def record(self) -> dict[str, Any]:
        """What the store keeps to rebuild this job after a restart."""
        return {"accepted": self.accepted, "lease": self.lease, "lease_constraints": self.lease_constraints,
                "parent_job_id": self.parent_job_id, "last_seq": self.last_seq}


class JobTable:
    """Every job the supervisor knows, and the idempotency keys of each principal."""

    def __init__(self, retention_jobs: int = 10000, retention_seconds: int = 86400) -> None:
        self.jobs: dict[str, Job] = {}
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.retention_jobs = retention_jobs
        self.retention_seconds = retention_seconds
        self.idempotency: dict[tuple[str, str], tuple[bytes, str]] = {}

    def lookup_idempotent(self, principal: str, req: SubmitRequest) -> Job | None:
        """The job of an earlier submit with this key, or None; DuplicateKey if parameters differ."""
        if req.idempotency_key is None:
            return None
        entry = self.idempotency.get((principal, req.idempotency_key))
        if entry is None:
            return None
        fp, job_id = entry
        job = self.jobs.get(job_id)
        if job is None:
            del self.idempotency[(principal, req.idempotency_key)]
            return None
        if fp != req.fingerprint():
            raise DuplicateKey(
                f"idempotency key {req.idempotency_key!r} was used with different parameters (job {job_id})"
            )
        return job

    def create(self, principal: str, owner: Session, req: SubmitRequest, sandbox: list[str],
               job_id: str | None = None) -> Job:
        job_id = job_id or new_id("job")
        created_at = now_ts()
        wire_limits = req.limits.as_wire()
        lease = dict(req.lease)
        if LIMITS_KEY in lease:
            lease[LIMITS_KEY] = [f"{k}:{v}" for k, v in wire_limits.items() if k in req.asked_limits]
        p: dict[str, Any] = {"job_id": job_id, "agent": req.agent.ref, "accepted_at": created_at,
                             "lease": lease, "trace_id": req.trace_id}
        if req.lease_constraints:
            p["lease_constraints"] = req.lease_constraints
        if req.parent_job_id is not None:
            p["parent_job_id"] = req.parent_job_id
        if req.delegate_id is not None:
            p["delegate_id"] = req.delegate_id
        p[LIMITS_KEY] = wire_limits
        p[SANDBOX_KEY] = sandbox
        job = Job(
            id=job_id, principal=principal, owner_id=owner.id, agent_ref=req.agent.ref, trace_id=req.trace_id,
            created_at=created_at, lease=lease, lease_constraints=req.lease_constraints,
            parent_job_id=req.parent_job_id, idempotency_key=req.idempotency_key,
            fingerprint=req.fingerprint() if req.idempotency_key is not None else None,
            authority=Authority(req.lease, req.expires_at), accepted=p, request=req, owner=owner,
        )
        self.add(job)
        return job

    def discard(self, job: Job) -> None:
        """A job created and then not accepted (another process's job held its key)."""
        self.jobs.pop(job.id, None)
        if job.idempotency_key is not None:
            key = (job.principal, job.idempotency_key)
            entry = self.idempotency.get(key)
            if entry is not None and entry[1] == job.id:
                del self.idempotency[key]

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        if job.idempotency_key is not None and job.fingerprint is not None:
            self.idempotency[(job.principal, job.idempotency_key)] = (job.fingerprint, job.id)
        if job.done:
            self.finished[job.id] = None

    def finished_job(self, job: Job, now_mono: float) -> list[str]:
        """A job ended at `now_mono`; return the ids of finished jobs retention now drops."""
        job.finished_mono = now_mono
        self.finished[job.id] = None
        dropped = []
        while len(self.finished) > self.retention_jobs:
            dropped.append(self._drop_oldest())
        return dropped

    def expire(self, now_mono: float) -> list[str]:
        """Drop finished jobs older than the retention period."""
        dropped = []
        while self.finished:
            oldest = self.jobs.get(next(iter(self.finished)))
            if oldest is not None and oldest.finished_mono is not None and \
                    now_mono - oldest.finished_mono < self.retention_seconds:
                break
            dropped.append(self._drop_oldest())
        return dropped

    def _drop_oldest(self) -> str:
        old_id, _ = self.finished.popitem(last=False)
        old = self.jobs.pop(old_id, None)
        if old is not None and old.idempotency_key is not None:
            entry = self.idempotency.get((old.principal, old.idempotency_key))
            if entry is not None and entry[1] == old_id:
                del self.idempotency[(old.principal, old.idempotency_key)]
        return old_id


