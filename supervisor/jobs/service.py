"""The jobs' side of the runtime: submit and delegate (checks, idempotency, admission,
credentials), start when admitted, cancel, and the terminal's bookkeeping."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio
import orjson

from shared.envelope import Envelope, frame
from shared.errors import DuplicateKey, InternalError, JobNotFound, PermissionDenied
from shared.ids import new_id, new_ulid, now_ts
from shared.messages import QUEUED
from supervisor import metrics
from supervisor.core.admission import Admission
from supervisor.core.delegation import carve_budget, delegating_parent, share_budget
from supervisor.core.frames import GO
from supervisor.core.jobs import Job, JobTable, SubmitRequest, parse_submit
from supervisor.core.registry import AgentRegistry
from supervisor.core.requests import Cancel
from supervisor.core.session import FrameTooLarge, Session
from supervisor.core.usage import outcome_of, usage_wire
from supervisor.jobs.delivery import Delivery
from supervisor.jobs.provisioning import Credentials
from supervisor.state.base import StateStore, StoredJob, StoreError

log = logging.getLogger("arcp.runtime")
INLINE_KEPT = 4096  # terminal values larger than this live only in the store
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], bool]  # False: not run (closing)
MakeRunner = Callable[[Job], Any]  # a JobRunner for an accepted job


class JobService:
    def __init__(self, jobs: JobTable, store: StateStore, delivery: Delivery, admission: Admission,
                 credentials: Credentials | None, spawn: Spawn, registry: Callable[[], AgentRegistry],
                 layers: Callable[[SubmitRequest], list[str]], make_runner: MakeRunner) -> None:
        self.jobs = jobs
        self.store = store
        self.delivery = delivery
        self.admission = admission
        self.credentials = credentials
        self._spawn = spawn
        self._registry = registry  # the current one: a reload replaces it
        self._layers = layers  # the sandbox layers a job of this request gets
        self._make_runner = make_runner
        self.draining = False
        self.claim_keys = False  # several processes share the store: a key is claimed there, awaited
        # a job of another process holding a submit's key, given to the session (supervisor/cluster/)
        self.replay_held: Callable[[Session, Envelope, StoredJob], Awaitable[None]] | None = None
        self._starts = 0  # jobs started so far: each one's place in the start order
        self._ended = anyio.Event()  # set (and replaced) at every job's terminal
        self._delivering: set[str] = set()  # ended, the terminal frame waiting for revocations

    # -- submit and delegate ------------------------------------------------------
    async def submit(self, session: Session, env: Envelope) -> None:
        if self.draining:
            raise InternalError("the server is shutting down and takes no new jobs", retryable=True,
                                details={"reason": "draining"})
        req = parse_submit(env, self._registry(), time.time())
        parent = delegating_parent(self.jobs, session.principal, req) if req.parent_job_id is not None else None
        self.admission.check_size(req.limits.memory)  # a job that could never start
        existing = self.jobs.lookup_idempotent(session.principal, req)
        if existing is not None:
            await self.delivery.replay_accept(session, env.id, existing)
            return
        self.admission.check(session.principal, req.limits.memory)  # overloaded
        job_id = new_id("job")
        claimed = None
        if self.claim_keys and req.idempotency_key is not None:
            claimed = await self._claim(session, env, req, job_id)
            if claimed is None:
                return  # another process's job holds the key: replayed
        creds = None
        try:
            if self.credentials is not None and "provisioned_credentials" in session.features:
                creds = await self.credentials.issue(job_id, session.principal, req)
            if parent is not None:
                if parent.done:  # it ended while the credentials were issued
                    raise JobNotFound(f"no running parent job {parent.id!r}")
                carve_budget(parent, req, time.time())
        except BaseException:
            if claimed is not None:  # the submit failed: its key is free again, in the database too
                self.jobs.discard(claimed)
                self.store.delete_jobs([claimed.id])
            raise
        job = self._accept(session, req, job_id, claimed)
        if creds and self.credentials is not None:
            self.credentials.issued(job, creds)
        metrics.job_accepted(job, env, parent)
        if parent is not None:
            share_budget(parent, job)
        if self.store.durable:  # the job's record is on disk before the client hears of it
            await self.store.sync()
        try:
            session.send(frame("job.accepted", new_ulid(), job.accepted_payload(session.flavour, env.id),
                               session_id=session.id, job_id=job.id, trace_id=job.trace_id,
                               extensions=job.accepted_extensions()))
        except FrameTooLarge as e:  # the client never learns of the job: it does not run
            job.runner.refuse(InternalError(f"job.accepted does not fit one frame: {e}", retryable=False))
            raise
        if parent is not None:
            self._delegated(parent, job)
        self._admit(job)

    def delegate(self, parent: Job, agent: Any, input: Any, lease: Any) -> str:
        """An agent's job.delegate: a child job in the parent's session, under the same checks."""
        if parent.owner is None:
            raise JobNotFound("the parent job's session is gone")
        payload: dict[str, Any] = {"agent": agent, "input": input, "lease_request": lease or {},
                                   "parent_job_id": parent.id}
        env = Envelope(type="job.submit", id=new_ulid(), payload=payload, trace_id=parent.trace_id)
        req = parse_submit(env, self._registry(), time.time())
        delegating_parent(self.jobs, parent.principal, req)
        self.admission.check(parent.principal, req.limits.memory)  # children wait their turn too
        carve_budget(parent, req, time.time())
        child = self._accept(parent.owner, req)
        metrics.job_accepted(child, env, parent)
        share_budget(parent, child)
        self._delegated(parent, child)
        self._admit(child)
        return child.id

    async def _claim(self, session: Session, env: Envelope, req: SubmitRequest, job_id: str) -> Job | None:
        """Several processes share the store: the job's record is inserted now, awaited, so that
        one job holds the key whichever process each submit reaches. The job (not yet running),
        or None when another process's job held the key (then replayed to the session)."""
        job = self.jobs.create(session.principal, session, req, self._layers(req), job_id)
        try:
            held = await self.store.claim_job(job.id, job.principal, job.owner_id, job.agent_ref, job.status,
                                              job.created_at, job.trace_id, job.idempotency_key, job.fingerprint,
                                              job.record())
        except BaseException:
            self.jobs.discard(job)
            raise
        if held is None:
            return job
        self.jobs.discard(job)
        if held.fingerprint != req.fingerprint():
            raise DuplicateKey(f"idempotency key {req.idempotency_key!r} was used with different parameters "
                               f"(job {held.job_id})")
        if self.replay_held is None:
            raise InternalError(f"idempotency key {req.idempotency_key!r} is held by job {held.job_id}")
        await self.replay_held(session, env, held)
        return None

    def _accept(self, session: Session, req: SubmitRequest, job_id: str | None = None,
                claimed: Job | None = None) -> Job:
        """The job's record (inserted now, unless `claimed` already), its runner and its lease
        expiry; it starts when admitted."""
        if claimed is not None:
            job = claimed
        else:
            job = self.jobs.create(session.principal, session, req, self._layers(req), job_id)
            self.store.insert_job(job.id, job.principal, job.owner_id, job.agent_ref, job.status, job.created_at,
                                  job.trace_id, job.idempotency_key, job.fingerprint, job.record())
        runner = self._make_runner(job)
        job.runner = runner
        runner.arm_timers()
        return job

    def _delegated(self, parent: Job, child: Job) -> None:
        parent.children.append(child.id)
        self.delivery.emit_event(parent, "delegate", {"child_job_id": child.id, "agent": child.agent_ref,
                                                      "lease": child.lease})

    # -- admission ---------------------------------------------------------------
    def _admit(self, job: Job) -> None:
        """After its job.accepted: start the job, or queue it with one `queued` status event."""
        assert job.request is not None
        starts = self.admission.submit(job.id, job.principal, job.request.limits.memory)
        if job.id not in starts:
            self.delivery.emit_event(job, "status", {"phase": QUEUED,
                                                     "message": f"position {self.admission.position(job.id)}"})
        self.start_jobs(starts)

    def start_jobs(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = self.jobs.jobs.get(job_id)
            if job is None or job.runner is None or job.done:  # cannot happen: ended jobs leave admission
                log.error("admission started job %s, which is not waiting", job_id)
                self.start_jobs(self.admission.finish(job_id))
                continue
            if not self._spawn(job.runner.run):  # (run() begins after this: it is started below)
                job.runner.refuse(InternalError("the server is shutting down", retryable=True,
                                                details={"reason": "draining"}))
                continue
            self._starts += 1
            metrics.job_started(job)
            job.runner.start(self._starts)

    # -- cancel ------------------------------------------------------------------
    def cancel(self, session: Session, req: Cancel) -> None:
        job = self.jobs.jobs.get(req.job_id)
        if job is None:
            raise JobNotFound(f"no job {req.job_id[:128]!r}")
        own = job.principal == session.principal and job.owner_id == session.id
        if not own and session.admin:
            if not job.done:
                log.info("session %s (admin %s) cancels job %s of %s", session.id, session.principal, job.id,
                         job.principal)
                job.runner.request_stop("cancel", req.reason)
            return
        if not own:
            if session.flavour == GO:
                raise PermissionDenied(f"only the submitting session may cancel job {req.job_id[:128]!r}")
            log.info("session %s: cancel of %s refused (not the submitter)", session.id, job.id)
            return
        if not job.done:  # a finished job: silent no-op
            job.runner.request_stop("cancel", req.reason)

    def cancel_jobs(self, reason: str) -> None:
        """Cancel every job still running: each ends with job.cancelled and its terminal."""
        for job in list(self.jobs.jobs.values()):
            if job.terminal is None and job.runner is not None:
                job.runner.request_stop("cancel", reason)

    def unfinished_jobs(self, owner_id: str | None = None) -> list[Job]:
        """Jobs without a terminal yet (of one session, or all)."""
        return [j for j in self.jobs.jobs.values()
                if (j.terminal is None or j.id in self._delivering) and (owner_id is None or j.owner_id == owner_id)]

    async def wait_jobs(self, timeout: float | None, *, owner_id: str | None = None,
                        hurry: anyio.Event | None = None) -> bool:
        """Until every job (of `owner_id`) has its terminal: True; False once `timeout` has
        passed or `hurry` is set first."""
        with anyio.move_on_after(timeout):
            while self.unfinished_jobs(owner_id):
                if hurry is not None and hurry.is_set():
                    return False
                ended = self._ended
                if hurry is None:
                    await ended.wait()
                else:
                    async with anyio.create_task_group() as tg:
                        async def either(ev: anyio.Event) -> None:
                            await ev.wait()
                            tg.cancel_scope.cancel()
                        tg.start_soon(either, ended)
                        tg.start_soon(either, hurry)
            return True
        return False

    # -- the end ------------------------------------------------------------------
    def finish(self, job: Job, status: str, err: dict[str, Any] | None, *, value: Any = None,
               result_id: str | None = None, result_size: int | None = None,
               usage: dict[str, Any] | None = None) -> None:
        if job.terminal is not None:
            return
        metrics.job_ending(job)
        job.status = status
        job.terminal = t = {"status": status, "error": err, "value": value, "result_id": result_id,
                            "result_size": result_size, "completed_at": now_ts(), "usage": usage or usage_wire()}
        _log_end(job, status, err, t["usage"])
        if self.credentials is not None and job.credentials:
            # Revoked before the terminal frame leaves (Go's order): the frame follows the
            # first attempt at each; until then the job counts as unfinished for a drain.
            creds, job.credentials = [c["id"] for c in job.credentials], []
            credentials = self.credentials
            self._delivering.add(job.id)

            async def revoke_then_deliver() -> None:
                try:
                    await credentials.revoke_all(creds)
                    if self.store.durable:  # and the revocations recorded, across a restart
                        await self.store.sync()
                except StoreError as e:  # logged by the store; the revocation itself is done
                    log.warning("job %s: its credentials' revocation was not recorded: %s", job.id, e)
                finally:
                    self._delivering.discard(job.id)
                    self.delivery.terminal_reached(job, t)
                    self._signal_end()

            self._spawn(revoke_then_deliver)
        else:
            self.delivery.terminal_reached(job, t)
        kept = job.terminal  # as sent: a result too large for one frame was sent as an error
        self.store.finish_job(job.id, job.status, kept, job.record())
        if kept.get("value") is not None and len(orjson.dumps(kept["value"])) > INLINE_KEPT:
            job.terminal = {**kept, "value": None, "value_in_store": True}
        for child_id in job.children:  # children end with their parent
            child = self.jobs.jobs.get(child_id)
            if child is not None and not child.done and child.runner is not None:
                child.runner.request_stop("cancel", f"parent job {job.id} ended")
        job.runner = None
        job.request = None  # the input and the agent spec are no longer needed
        job.tmp_dir = None  # the worker's: emptied when it is kept for another job, removed with it
        self.store.delete_jobs(self.jobs.finished_job(job, time.monotonic()))
        metrics.job_ended(job)
        self.start_jobs(self.admission.finish(job.id))  # its place, running or waiting, is free
        if job.id not in self._delivering:
            self._signal_end()

    def _signal_end(self) -> None:
        ended, self._ended = self._ended, anyio.Event()
        ended.set()


def usage_of(job: Job) -> dict[str, Any] | None:
    """A list entry's usage: so far for a running job, all of it for a finished one."""
    if job.terminal is not None:
        return job.terminal.get("usage")
    runner = job.runner
    return runner.usage_so_far() if runner is not None and runner.started else None


def _log_end(job: Job, status: str, err: dict[str, Any] | None, usage: dict[str, Any]) -> None:
    """The job's one record of its end (its start's is the runner's)."""
    outcome = outcome_of(status, err)
    logging.getLogger("arcp.jobs").info("job ended: %s", outcome, extra={
        "job_id": job.id, "session_id": job.owner_id, "principal": job.principal, "agent": job.agent_ref,
        "outcome": outcome, "code": (err or {}).get("code"), "duration_s": usage["wall_s"],
        "cpu_s": round(usage["cpu_user_s"] + usage["cpu_sys_s"], 3), "memory_peak_mb": usage["memory_peak_mb"]})
