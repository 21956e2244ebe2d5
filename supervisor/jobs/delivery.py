"""Delivery of a job's frames: to the session that submitted it (sequenced, kept for
resume), to the sessions that follow it (subscribe, idempotent replays), with the
back-pressure signal, the terminal frame, and a subscriber's history."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import orjson

from shared.envelope import Envelope, frame
from shared.errors import InternalError, InvalidRequest, JobNotFound, PermissionDenied
from shared.ids import new_ulid, now_ts
from supervisor.core.frames import GO, error_payload, result_payload
from supervisor.core.jobs import Job, JobTable, Watch
from supervisor.core.session import FrameTooLarge, Session
from supervisor.core.usage import USAGE_KEY, usage_wire
from supervisor.jobs.worker_rpc import WorkerProtocolError
from supervisor.state.base import StateStore

log = logging.getLogger("arcp.runtime")
SUBSCRIBE_PAUSE = 0.02  # protocol.md rule 11: let the Python client register the subscription
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], bool]  # False: not run (closing)


class Delivery:
    def __init__(self, jobs: JobTable, store: StateStore, back_pressure_threshold: int, frame_cap: int,
                 spawn: Spawn) -> None:
        self.jobs = jobs
        self.store = store
        self.back_pressure_threshold = back_pressure_threshold
        self.frame_cap = frame_cap
        self._spawn = spawn

    # -- live frames ----------------------------------------------------------
    def emit_event(self, job: Job, kind: str, body: dict[str, Any]) -> None:
        payload = {"kind": kind, "ts": now_ts(), "body": body}
        owner = job.owner
        try:
            # a feature a session did not negotiate is not used toward it (protocol §4.3)
            if owner is not None and (kind != "progress" or "progress" in owner.features):
                env = frame("job.event", new_ulid(), payload, session_id=owner.id, job_id=job.id,
                            trace_id=job.trace_id)
                job.last_seq = owner.send_seq(env, job.id)
                if self.back_pressure_threshold and not owner.back_pressure_signalled \
                        and owner.lag() >= self.back_pressure_threshold:
                    self._signal_back_pressure(owner, job)
            for w in job.watchers:
                if kind != "progress" or "progress" in w.session.features:
                    self._forward(w, job, "job.event", payload)
        except FrameTooLarge as e:
            raise WorkerProtocolError(f"event does not fit one frame: {e}") from e

    def _signal_back_pressure(self, s: Session, job: Job) -> None:
        s.back_pressure_signalled = True
        body = {"phase": "back_pressure", "message": "unacked event lag exceeded threshold",
                "details": {"threshold": self.back_pressure_threshold, "current_seq": s.seq + 1,
                            "last_ack": s.last_ack}}
        env = frame("job.event", new_ulid(), {"kind": "status", "ts": now_ts(), "body": body},
                    session_id=s.id, job_id=job.id, trace_id=job.trace_id)
        job.last_seq = s.send_seq(env, job.id)

    def _forward(self, w: Watch, job: Job, type_: str, payload: dict[str, Any]) -> None:
        if w.pending is not None:
            w.pending.append((type_, payload))
            return
        s = w.session
        s.send_seq(frame(type_, new_ulid(), payload, session_id=s.id, job_id=job.id, trace_id=job.trace_id),
                   job.id)

    def emit_cancelled(self, job: Job, reason: str) -> None:
        s = job.owner
        if s is not None:
            job.last_seq = s.send_seq(frame("job.cancelled", new_ulid(), {"job_id": job.id, "reason": reason},
                                            session_id=s.id, job_id=job.id, trace_id=job.trace_id), job.id)

    def credential_rotated(self, job: Job, credential_id: str, new_value: str) -> None:
        """Only the submitting session hears of it: never kept for replay, never forwarded."""
        s = job.owner
        if s is not None:
            body = {"phase": "credential_rotated", "message": credential_id, "id": credential_id,
                    "value": new_value, "details": {"id": credential_id, "value": new_value}}
            s.send_seq(frame("job.event", new_ulid(), {"kind": "status", "ts": now_ts(), "body": body},
                             session_id=s.id, job_id=job.id, trace_id=job.trace_id), job.id, log=False)

    # -- terminals ------------------------------------------------------------
    def terminal_reached(self, job: Job, t: dict[str, Any]) -> None:
        """The job's terminal frame (of outcome `t`) to its submitter and to every session
        following it (a follower still being given history gets it after that history)."""
        if job.owner is not None:
            self.send_terminal(job.owner, job, t, log=True)
        for w in job.watchers:
            if w.pending is not None:
                w.pending.append(("terminal", {}))
            else:
                self.send_terminal(w.session, job, t, log=True)
        job.watchers = [w for w in job.watchers if w.pending is not None]

    async def terminal_of(self, job: Job) -> dict[str, Any]:
        """The job's terminal outcome, its value read back from the store when it was too
        large to keep in memory."""
        t = job.terminal
        assert t is not None
        if t.get("value_in_store"):
            stored = await self.store.terminal_of(job.id)
            if stored is not None:
                return stored
        return t

    def send_outcome(self, s: Session, job_id: str, trace_id: str, t: dict[str, Any], log: bool) -> int:
        """A job's terminal frame of outcome `t`, in the session's flavour; its seq."""
        usage = t.get("usage") or usage_wire()  # (a job restored from an older store has none)
        if t["error"] is None:
            payload = result_payload(t["value"], completed_at=t["completed_at"], flavour=s.flavour,
                                     result_id=t["result_id"], result_size=t["result_size"], usage=usage)
            kind = "job.result"
        else:
            payload = error_payload(t["error"], status=t["status"], completed_at=t["completed_at"],
                                    flavour=s.flavour, usage=usage)
            kind = "job.error"
        env = frame(kind, new_ulid(), payload, session_id=s.id, job_id=job_id, trace_id=trace_id,
                    extensions={USAGE_KEY: usage})
        return s.send_seq(env, job_id, log=log)

    def send_terminal(self, s: Session, job: Job, t: dict[str, Any], log: bool) -> None:
        usage = t.get("usage") or usage_wire()
        try:
            seq = self.send_outcome(s, job.id, job.trace_id, t, log)
        except FrameTooLarge:
            job.terminal = t = {**t, "status": "error", "value": None, "error": InternalError(
                f"inline result of {len(orjson.dumps(t['value']))} bytes does not fit one frame "
                f"({self.frame_cap} bytes); use job.stream_result for large results",
                retryable=False).to_wire()}
            job.status = "error"
            seq = s.send_seq(frame("job.error", new_ulid(), error_payload(
                t["error"], status="error", completed_at=t["completed_at"], flavour=s.flavour, usage=usage),
                session_id=s.id, job_id=job.id, trace_id=job.trace_id, extensions={USAGE_KEY: usage}),
                job.id, log=log)
        if s.id == job.owner_id and log:
            job.last_seq = seq

    # -- followers ----------------------------------------------------------------
    async def replay_accept(self, session: Session, request_id: str, job: Job) -> None:
        """An idempotent resubmission: the job's job.accepted again, then its terminal if it
        has one; another session follows it from now on (§11.7, without cancel authority)."""
        session.send(frame("job.accepted", new_ulid(), job.accepted_payload(session.flavour, request_id),
                           session_id=session.id, job_id=job.id, trace_id=job.trace_id,
                           extensions=job.accepted_extensions()))
        if job.terminal is not None:
            self.send_terminal(session, job, await self.terminal_of(job), log=session.id != job.owner_id)
        elif session.id != job.owner_id and not any(w.session is session for w in job.watchers):
            job.watchers.append(Watch(session))

    async def subscribe(self, session: Session, env: Envelope, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id[:128]!r}")
        if job.principal != session.principal and not session.admin:
            log.info("subscribe refused: %s (%s) to %s of %s", session.id, session.principal, job_id,
                     job.principal)
            raise PermissionDenied(f"job {job_id[:128]!r} belongs to another principal")
        history = env.payload.get("history", False)
        from_seq = env.payload.get("from_event_seq", 0) or 0
        if not isinstance(history, bool):
            raise InvalidRequest("job.subscribe field 'history' must be a boolean")
        if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 0:
            raise InvalidRequest("job.subscribe field 'from_event_seq' must be an integer >= 0")
        # Follow first, then read the history: what the job sends meanwhile waits in `pending`
        # and follows the history in order.
        watch = Watch(session, pending=[])
        own_live = session.id == job.owner_id and job.terminal is None  # the submitter gets every frame
        if job.terminal is not None:
            watch.pending = [("terminal", {})]
        elif not own_live:
            job.watchers = [w for w in job.watchers if w.session is not session] + [watch]
        frames = await self.store.job_frames(job.owner_id, job.id, from_seq) if history else []
        replay = [orjson.loads(f) for f in frames]
        replay = [f for f in replay if f.get("type") != "job.cancelled"]
        if job.terminal is not None:
            replay = [f for f in replay if f.get("type") not in ("job.result", "job.error")]
        p: dict[str, Any] = {"request_id": env.id, "job_id": job.id, "current_status": job.status,
                             "agent": job.agent_ref, "lease": job.lease, "trace_id": job.trace_id,
                             "subscribed_from": session.seq,
                             "replayed": bool(replay) if session.flavour == GO else len(replay)}
        if job.lease_constraints:
            p["lease_constraints"] = job.lease_constraints
        if job.authority.initial:
            p["budget"] = {c: float(v) for c, v in job.authority.remaining.items()}
        if job.parent_job_id:
            p["parent_job_id"] = job.parent_job_id
        session.send(frame("job.subscribed", new_ulid(), p, session_id=session.id, job_id=job.id,
                           trace_id=job.trace_id))
        log.info("subscribe: %s (%s%s) follows %s of %s", session.id, session.principal,
                 ", admin" if session.admin else "", job_id, job.principal)
        if own_live:
            return

        async def flush() -> None:
            await anyio.sleep(SUBSCRIBE_PAUSE)
            await self._flush_watch(watch, job, replay)

        self._spawn(flush)

    async def _flush_watch(self, watch: Watch, job: Job, replay: list[dict[str, Any]]) -> None:
        """After the pause: history, then whatever arrived meanwhile, then live."""
        s = watch.session
        for f in replay:
            if f.get("type") == "job.event":
                s.send_seq(frame("job.event", new_ulid(), f["payload"], session_id=s.id, job_id=job.id,
                                 trace_id=job.trace_id), job.id)
        pending, watch.pending = watch.pending or [], None  # from here live frames go straight to it
        for type_, payload in pending:
            if type_ == "terminal":  # always the last: nothing follows a job's terminal
                self.send_terminal(s, job, await self.terminal_of(job), log=True)
                job.watchers = [w for w in job.watchers if w is not watch]
                break
            self._forward(watch, job, type_, payload)

    def unsubscribe(self, session: Session, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is not None:
            job.watchers = [w for w in job.watchers if w.session is not session]

    def forget_session(self, s: Session) -> None:
        for job in self.jobs.jobs.values():
            job.watchers = [w for w in job.watchers if w.session is not s]
