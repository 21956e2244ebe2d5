"""The runtime: sessions, the job table, the worker pool, and delivery of job frames."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from shared.envelope import Envelope, frame
from shared.errors import InternalError, InvalidRequest, JobNotFound, PermissionDenied
from shared.ids import new_ulid, now_ts, parse_ts
from shared.messages import TERMINAL_STATUSES
from supervisor.config import Config
from supervisor.frames import GO, error_payload, result_payload
from supervisor.job_runner import JobRunner
from supervisor.jobs import Job, JobTable, parse_submit
from supervisor.registry import AgentRegistry
from supervisor.session import FrameTooLarge, Session
from supervisor.worker_proc import ForkServer, WorkerPool
from supervisor.worker_rpc import WorkerProtocolError

log = logging.getLogger("arcp.runtime")
WS_FRAME_CAP = 1024 * 1024 - 4096
STDIO_FRAME_CAP = 64 * 1024 - 1024
SUBSCRIBE_PAUSE = 0.02  # protocol.md rule 11
LIST_MAX = 1000
ENV_PASSED = ("PATH", "LANG", "TZ")


def worker_env() -> dict[str, str]:
    """The scrubbed environment of the fork server and so of every worker."""
    env = {k: v for k, v in os.environ.items() if k in ENV_PASSED or k.startswith("LC_")}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Runtime:
    def __init__(self, config: Config, frame_cap: int = WS_FRAME_CAP) -> None:
        self.config = config
        self.frame_cap = frame_cap
        self.registry = AgentRegistry(config.agents, config.defaults)
        self.jobs = JobTable(config.retention_jobs)
        modules = sorted({a.entry.split(":", 1)[0] for a in config.agents})
        self.fork_server = ForkServer(worker_env(), os.getcwd(), modules)
        self.pool = WorkerPool(self.fork_server, config.warm_workers, config.reuse_workers)
        self.sandbox_layers: list[str] = ["process-group", "parent-death-signal", "scrubbed-env"]
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.fork_server.start()
        self.pool.start()

    async def close(self) -> None:
        for job in list(self.jobs.jobs.values()):
            if not job.done and job.runner is not None:
                job.runner.request_stop("cancel", "server shutting down")
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.grace + 1.0)
        self.pool.close()
        self.fork_server.close()

    # -- jobs ---------------------------------------------------------------
    def reuse_key(self, job: Job) -> tuple[Any, ...]:
        r = job.request
        return (job.principal, r.agent.ref, repr(sorted(r.lease.items())), r.limits,
                r.lease_constraints.get("expires_at"))

    def job_spec(self, job: Job) -> dict[str, Any]:
        r = job.request
        return {
            "job_id": job.id, "session_id": job.owner.id, "trace_id": r.trace_id, "agent": r.agent.ref,
            "entry": r.agent.entry, "input": r.input, "lease": r.lease,
            "lease_constraints": r.lease_constraints, "max_result_bytes": self.config.max_result_bytes,
            "max_event_bytes": self.frame_cap - 8192, "chunk_size": self.config.chunk_size,
        }

    def submit(self, session: Session, env: Envelope) -> None:
        import time

        req = parse_submit(env, self.registry, time.time())
        existing = self.jobs.lookup_idempotent(session.principal, req)
        if existing is not None:
            self._replay_accept(session, env.id, existing)
            return
        job = self.jobs.create(session.principal, session, req, self.sandbox_layers)
        session.send(frame("job.accepted", new_ulid(), job.accepted_payload(session.flavour, env.id),
                           session_id=session.id, job_id=job.id, trace_id=job.trace_id))
        runner = JobRunner(self, job)
        job.runner = runner
        runner.arm_timers()
        task = asyncio.get_running_loop().create_task(runner.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _replay_accept(self, session: Session, request_id: str, job: Job) -> None:
        session.send(frame("job.accepted", new_ulid(), job.accepted_payload(session.flavour, request_id),
                           session_id=session.id, job_id=job.id, trace_id=job.trace_id))
        if job.terminal is not None:
            self._send_terminal(session, job)
        elif session is not job.owner and session not in job.watchers:
            job.watchers.append(session)  # §11.7: follow the job, without cancel authority

    def _recipients(self, job: Job) -> list[Session]:
        if not job.watchers:
            return [job.owner]
        return [job.owner, *job.watchers]

    def emit_event(self, job: Job, kind: str, body: dict[str, Any]) -> None:
        payload = {"kind": kind, "ts": now_ts(), "body": body}
        for s in self._recipients(job):
            env = frame("job.event", new_ulid(), payload, session_id=s.id, job_id=job.id,
                        trace_id=job.trace_id)
            try:
                s.send_seq(env)
            except FrameTooLarge as e:
                raise WorkerProtocolError(f"event does not fit one frame: {e}") from e

    def emit_cancelled(self, job: Job, reason: str) -> None:
        s = job.owner
        s.send_seq(frame("job.cancelled", new_ulid(), {"job_id": job.id, "reason": reason},
                         session_id=s.id, job_id=job.id, trace_id=job.trace_id))

    def finish(self, job: Job, status: str, err: dict[str, Any] | None, *, value: Any = None,
               result_id: str | None = None, result_size: int | None = None) -> None:
        if job.terminal is not None:
            return
        job.status = status
        job.terminal = {"status": status, "error": err, "value": value, "result_id": result_id,
                        "result_size": result_size, "completed_at": now_ts()}
        for s in self._recipients(job):
            self._send_terminal(s, job)
        self.jobs.finished_job(job)

    def _send_terminal(self, s: Session, job: Job) -> None:
        t = job.terminal
        assert t is not None
        if t["error"] is None:
            payload = result_payload(t["value"], completed_at=t["completed_at"], flavour=s.flavour,
                                     result_id=t["result_id"], result_size=t["result_size"])
            kind = "job.result"
        else:
            payload = error_payload(t["error"], status=t["status"], completed_at=t["completed_at"],
                                    flavour=s.flavour)
            kind = "job.error"
        env = frame(kind, new_ulid(), payload, session_id=s.id, job_id=job.id, trace_id=job.trace_id)
        try:
            s.send_seq(env)
        except FrameTooLarge:
            size = len(repr(t["value"]))
            t["status"], t["value"] = "error", None
            t["error"] = InternalError(
                f"inline result of about {size} bytes does not fit one frame ({self.frame_cap} bytes); "
                "use job.stream_result for large results", retryable=False).to_wire()
            job.status = "error"
            s.send_seq(frame("job.error", new_ulid(), error_payload(
                t["error"], status="error", completed_at=t["completed_at"], flavour=s.flavour),
                session_id=s.id, job_id=job.id, trace_id=job.trace_id))

    # -- list and subscribe ---------------------------------------------------
    def list_jobs(self, session: Session, env: Envelope) -> dict[str, Any]:
        p = env.payload
        flt = p.get("filter") or {}
        if not isinstance(flt, dict):
            raise InvalidRequest("session.list_jobs field 'filter' must be an object")
        statuses = flt.get("status")
        if statuses is not None and (not isinstance(statuses, list)
                                     or not all(isinstance(x, str) for x in statuses)):
            raise InvalidRequest("session.list_jobs filter 'status' must be a list of strings")
        agent = flt.get("agent")
        if agent is not None and not isinstance(agent, str):
            raise InvalidRequest("session.list_jobs filter 'agent' must be a string")
        after = before = None
        try:
            if flt.get("created_after") is not None:
                after = parse_ts(flt["created_after"]).timestamp()
            if flt.get("created_before") is not None:
                before = parse_ts(flt["created_before"]).timestamp()
        except ValueError as e:
            raise InvalidRequest(f"session.list_jobs filter: bad timestamp: {e}") from e
        limit = p.get("limit") or LIST_MAX
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidRequest("session.list_jobs field 'limit' must be a non-negative integer")
        limit = min(limit, LIST_MAX)
        cursor = p.get("cursor")
        start = 0
        if cursor is not None:
            if not isinstance(cursor, str) or not cursor.startswith("o:") or not cursor[2:].isdigit():
                raise InvalidRequest("session.list_jobs field 'cursor' is not a cursor this server issued")
            start = int(cursor[2:])
        rows = []
        for job in self.jobs.jobs.values():
            if job.principal != session.principal:
                continue
            if statuses is not None and job.status not in statuses:
                continue
            if agent is not None and agent != job.agent_ref and (
                    "@" in agent or job.agent_ref.split("@")[0] != agent):
                continue
            created = parse_ts(job.created_at).timestamp()
            if (after is not None and created < after) or (before is not None and created > before):
                continue
            rows.append(job)
        page = rows[start:start + limit]
        out = []
        for job in page:
            entry = {"job_id": job.id, "agent": job.agent_ref, "status": job.status,
                     "lease": job.request.lease, "created_at": job.created_at,
                     "submitted_at": job.created_at, "trace_id": job.trace_id}
            if job.request.parent_job_id:
                entry["parent_job_id"] = job.request.parent_job_id
            out.append(entry)
        payload: dict[str, Any] = {"request_id": env.id, "jobs": out}
        if start + limit < len(rows):
            payload["next_cursor"] = f"o:{start + limit}"
        return frame("session.jobs", new_ulid(), payload, session_id=session.id)

    def subscribe(self, session: Session, env: Envelope, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r}")
        if job.principal != session.principal:
            raise PermissionDenied(f"job {job_id!r} belongs to another principal")
        p: dict[str, Any] = {"request_id": env.id, "job_id": job.id, "current_status": job.status,
                             "agent": job.agent_ref, "lease": job.request.lease,
                             "trace_id": job.trace_id, "subscribed_from": session.seq,
                             "replayed": False if session.flavour == GO else 0}
        if job.request.lease_constraints:
            p["lease_constraints"] = job.request.lease_constraints
        if job.authority.initial:
            p["budget"] = {c: float(v) for c, v in job.authority.remaining.items()}
        session.send(frame("job.subscribed", new_ulid(), p, session_id=session.id, job_id=job.id,
                           trace_id=job.trace_id))
        if job.terminal is not None:
            loop = asyncio.get_running_loop()
            loop.call_later(SUBSCRIBE_PAUSE, self._send_terminal, session, job)
        elif session is not job.owner and session not in job.watchers:
            job.watchers.append(session)

    def unsubscribe(self, session: Session, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is not None and session in job.watchers:
            job.watchers.remove(session)

    def session_closed(self, session: Session) -> None:
        """The session's transport is gone; its jobs go on (their frames are dropped)."""
        for job in self.jobs.jobs.values():
            if session in job.watchers:
                job.watchers.remove(session)


__all__ = ["Runtime", "STDIO_FRAME_CAP", "WS_FRAME_CAP", "TERMINAL_STATUSES"]
