"""The runtime: sessions, the job table, the store, the worker pool, and delivery of job frames."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from typing import Any

import orjson

from shared.envelope import Envelope, frame
from shared.errors import (
    InternalError, InvalidRequest, JobNotFound, LeaseSubsetViolation, PermissionDenied, ResumeWindowExpired,
    Unauthenticated,
)
from shared.lease import LeaseError, check_subset, initial_budget, lease_allows
from shared.landlock import landlock_abi
from shared.seccomp import seccomp_available
from shared.messages import FEATURES, QUEUED
from shared.ids import format_ts, new_id, new_resume_token, new_ulid, now_ts, parse_ts
from supervisor.core.admission import Admission
from supervisor.core.authority import Authority
from supervisor.sandbox.cgroups import Cgroups
from supervisor.config import DEFAULT_JOB_UIDS, Config, ConfigError, check_uid_range, default_memory_budget
from supervisor.jobs.credentials import Provisioner, ProvisionerError, load_provisioner
from supervisor.core.frames import GO, error_payload, result_payload
from supervisor.sandbox.job_dirs import JobDirs
from supervisor.jobs.runner import JobRunner
from supervisor.sandbox.job_uids import UidPool
from supervisor.core.limits import LIMITS_KEY, within
from supervisor import metrics
from supervisor.core.jobs import Job, JobTable, SubmitRequest, Watch, parse_submit
from supervisor.core.registry import AgentRegistry
from supervisor.core.session import FrameTooLarge, Session
from supervisor.state.store import Store, StoredJob
from supervisor.core.usage import USAGE_KEY, outcome_of, usage_wire
from supervisor.jobs.fork_server import ForkServer
from supervisor.jobs.pool import WorkerPool
from supervisor.jobs.worker_handle import WorkerHandle
from supervisor.jobs.worker_rpc import WorkerProtocolError

log = logging.getLogger("arcp.runtime")
WS_FRAME_CAP = 1024 * 1024 - 4096
STDIO_FRAME_CAP = 64 * 1024 - 1024
SUBSCRIBE_PAUSE = 0.02  # protocol.md rule 11: let the Python client register the subscription
LIST_MAX = 1000
ENV_PASSED = ("PATH", "LANG", "TZ")
SWEEP_INTERVAL = 5.0
INLINE_KEPT = 4096  # terminal values larger than this live only in the store
REVOKE_BACKOFF = (0.05, 0.25, 1.0, 5.0)


def sandbox_layers() -> list[str]:
    """The isolation layers every job gets from the host alone, before anything is set up
    (`start` decides the list again from what it set up), named as `doctor` names them."""
    from supervisor.sandbox import layers

    return layers.decide(layers.Host.read(), layers.Setup()).every_job


def job_uid_range(config: Config) -> tuple[int, int] | None:
    """The uids jobs run as: the configured range, or the default one, when the supervisor is
    root; None (jobs under the supervisor's uid) only for a supervisor that is not root and
    was told `--allow-shared-uid`. ConfigError otherwise, before anything starts."""
    if os.geteuid() != 0:
        if not config.allow_shared_uid:
            raise ConfigError("the supervisor is not root, so jobs would run under its own uid and could "
                              "change its resource limits and its files outside their lease; run it as "
                              "root, or pass --allow-shared-uid ([sandbox] allow_shared_uid) to accept that "
                              "(`arcp-supervisor doctor` lists what is then not enforced)")
        if config.job_uids is not None:
            log.warning("[sandbox] job_uids needs a supervisor running as root: ignored")
        return None
    if config.job_uids is not None:
        return config.job_uids
    check_uid_range(DEFAULT_JOB_UIDS, "the default job uid range (set [sandbox] job_uids)")
    return DEFAULT_JOB_UIDS


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
        self.jobs = JobTable(config.retention_jobs, config.retention_seconds)
        self.store = Store(config.state_dir, config.session_log_bytes)
        self.sessions: dict[str, Session] = {}
        modules = sorted({a.entry.split(":", 1)[0] for a in config.agents})
        self.cgroups = Cgroups()
        self.job_uid_range = job_uid_range(config)
        want_uids = self.job_uid_range is not None
        self.job_dirs = JobDirs(size=config.tmp_size, shared=want_uids)
        self.uids: UidPool | None = None  # job uids, once the fork server has confirmed them
        self.fork_server = ForkServer(worker_env(), os.getcwd(), modules, self.cgroups, job_uids=want_uids)
        # Warm workers are for jobs about to start: never more of them than jobs may run at once.
        self.pool = WorkerPool(self.fork_server, min(config.warm_workers, config.max_jobs), config.reuse_workers,
                               on_spawn=self._give_tmp_dir, on_keep=self._empty_tmp_dir)
        self.admission = admission_for(config)
        self._starts = 0  # jobs started so far: each one's place in the start order
        self.sandbox_layers = sandbox_layers() + self.cgroups.layers
        self.back_pressure_threshold = config.back_pressure_threshold
        self.provisioner: Provisioner | None = None
        if config.credentials_provisioner:
            try:
                self.provisioner = load_provisioner(config.credentials_provisioner, config.credentials_options)
            except (ImportError, AttributeError, TypeError, ValueError) as e:
                raise ConfigError(f"config key credentials.provisioner: cannot load "
                                  f"{config.credentials_provisioner!r}: {e}") from e
        # model.use and provisioned_credentials are offered only with a provisioner (protocol.md §4.3)
        self.features = FEATURES + (("model.use", "provisioned_credentials") if self.provisioner else ())
        self.egress_unavailable: str | None = "not started"  # why net.fetch jobs get no proxy, or None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.draining = False  # SIGTERM/SIGINT: no new sessions or submits; running jobs may end
        self._end_waiters: list[asyncio.Future[None]] = []  # woken at every job's terminal
        self._restore()

    async def start(self) -> None:
        if self.provisioner is not None:
            for cred_id in self.store.unrevoked_credentials(finished_only=False):  # left by a crash
                self._revoke(cred_id, attempt=0)
        self.fork_server.start()
        await self.fork_server.wait_ready()
        if self.job_uid_range is not None:
            if not self.fork_server.job_uids:  # never a fallback to the supervisor's uid
                self.fork_server.close()
                raise ConfigError(f"jobs cannot be given uids of their own: "
                                  f"{self.fork_server.job_uids_error or 'the fork server could not set them up'}")
            self.uids = UidPool(*self.job_uid_range)
            log.info("jobs run as uids %d-%d%s", *self.job_uid_range,
                     f" (a private mount view opens {', '.join(self.fork_server.opened)})"
                     if self.fork_server.opened else "")
        else:
            log.warning("jobs run under the supervisor's own uid %d (--allow-shared-uid): they can change "
                        "its resource limits and scheduling only where seccomp refuses it, and the "
                        "files it owns outside their lease keep only Landlock's protection", os.geteuid())
        from supervisor.sandbox import layers  # the same decision as `doctor`'s, from what was set up

        decided = layers.decide(layers.Host.read(), layers.confirmed(self.fork_server, self.cgroups, self.job_dirs))
        self.sandbox_layers, self.egress_unavailable = decided.every_job, decided.egress_unavailable
        for warning in decided.warnings:
            log.warning("%s", warning)
        self.pool.start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_loop())
        metrics.attach(self)

    async def close(self) -> None:
        """The end: whatever a drain left running is cancelled (its terminal logged for its
        session), then the workers, the fork server and the store go."""
        self.begin_drain()
        metrics.detach(self)
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.cancel_jobs("server shutting down")
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.config.grace + 1.0)
        self.pool.close()
        self.fork_server.close()
        self.fork_server.sweep_cgroups()
        self.cgroups.close()
        self.job_dirs.close()
        self.store.close()

    # -- drain (SIGTERM, SIGINT) ------------------------------------------------
    def begin_drain(self) -> None:
        """Refuse new sessions and submits from now on; the fork server is not restarted."""
        self.draining = True
        self.fork_server.restart = False

    def unfinished_jobs(self, owner_id: str | None = None) -> list[Job]:
        """Jobs without a terminal yet (of one session, or all)."""
        return [j for j in self.jobs.jobs.values()
                if j.terminal is None and (owner_id is None or j.owner_id == owner_id)]

    async def wait_jobs(self, timeout: float | None, *, owner_id: str | None = None,
                        hurry: asyncio.Event | None = None) -> bool:
        """Until every job (of `owner_id`) has its terminal: True; False once `timeout` has
        passed or `hurry` is set first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        hurried = loop.create_task(hurry.wait()) if hurry is not None else None
        try:
            while self.unfinished_jobs(owner_id):
                if hurried is not None and hurried.done():
                    return False
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    return False
                ended: asyncio.Future[None] = loop.create_future()
                self._end_waiters.append(ended)
                try:
                    await asyncio.wait({ended} | ({hurried} if hurried else set()), timeout=left,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if ended in self._end_waiters:
                        self._end_waiters.remove(ended)
            return True
        finally:
            if hurried is not None:
                hurried.cancel()

    def cancel_jobs(self, reason: str) -> None:
        """Cancel every job still running: each ends with job.cancelled and its terminal."""
        for job in list(self.jobs.jobs.values()):
            if job.terminal is None and job.runner is not None:
                job.runner.request_stop("cancel", reason)

    def close_sessions(self, reason: str = "server shutting down") -> int:
        """Tell each connected client the server is going (session.bye) and close its
        transport (1001) once what is queued for it has been written; how many."""
        n = 0
        for s in list(self.sessions.values()):
            if s.detached_at is None and not s.expired:
                s.send(frame("session.bye", new_ulid(), {"reason": reason}, session_id=s.id))
                s.close_transport(1001, "shutdown")
                n += 1
        return n

    def _job_ended(self) -> None:
        waiters, self._end_waiters = self._end_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- restart --------------------------------------------------------------
    def _restore(self) -> None:
        stored, interrupted = self.store.recover(self.config.retention_jobs, self.config.retention_seconds)
        for sj in stored:
            self.jobs.add(_restored_job(sj))
        if stored:
            log.info("restored %d finished jobs (%d were running and ended with INTERNAL_ERROR)",
                     len(stored), interrupted)

    # -- sessions -------------------------------------------------------------
    def open_session(self, session: Session) -> None:
        self.sessions[session.id] = session

    def resume(self, hello: Envelope, principal: str) -> tuple[Session, int]:
        """Check a resume request (protocol.md §5.1); the session and the client's last seq."""
        r = hello.payload.get("resume")
        if not isinstance(r, dict) or not isinstance(r.get("session_id"), str):
            raise InvalidRequest("session.hello 'resume' needs a 'session_id' string")
        sid, token, last = r["session_id"], r.get("resume_token"), r.get("last_event_seq", 0)
        if not isinstance(token, str):
            raise Unauthenticated("resume needs a 'resume_token' string")
        if last is None:
            last = 0
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise InvalidRequest("resume 'last_event_seq' must be an integer >= 0")
        s = self.sessions.get(sid)
        if s is None or s.expired or s.detached_at is None:
            raise ResumeWindowExpired(f"no resumable session {sid!r}")
        if time.monotonic() - s.detached_at > self.config.resume_window:
            self._expire_session(s)
            raise ResumeWindowExpired(f"the resume window of session {sid!r} has passed")
        if not hmac.compare_digest(token.encode(), s.resume_token.encode()) or principal != s.principal:
            raise Unauthenticated("resume token or principal does not match the session")
        if s.closed and not any(j.owner is s and not j.done for j in self.jobs.jobs.values()):
            raise ResumeWindowExpired(f"session {sid!r} was closed and has no running jobs")
        if last > s.seq:
            raise InvalidRequest(f"resume 'last_event_seq' {last} is beyond the session's last seq {s.seq}")
        oldest = self.store.oldest_seq(s.id)
        if last < s.seq and (oldest is None or oldest > last + 1):
            raise ResumeWindowExpired(
                f"events after seq {last} of session {sid!r} are no longer kept")
        s.resume_token = new_resume_token()
        s.closed = False
        return s, last

    def replay(self, s: Session, last: int) -> int:
        """Queue every logged frame after `last`, unchanged; returns how many."""
        rows = self.store.frames_since(s.id, last)
        for _, data in rows:
            s.outbox.put(data)
        return len(rows)

    def session_detached(self, s: Session) -> None:
        s.detach(time.monotonic())

    def _expire_session(self, s: Session) -> None:
        s.expired = True
        s.outbox.detach()
        self.sessions.pop(s.id, None)
        for job in self.jobs.jobs.values():
            job.watchers = [w for w in job.watchers if w.session is not s]
        self.store.forget_session(s.id)

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Forget sessions past their resume window and jobs past retention."""
        for s in list(self.sessions.values()):
            if s.detached_at is not None and now - s.detached_at > self.config.resume_window:
                self._expire_session(s)
        self.store.delete_jobs(self.jobs.expire(now))
        self.fork_server.sweep_cgroups()

    # -- workers' temp dirs (job_dirs) -------------------------------------------
    def _give_tmp_dir(self, worker: WorkerHandle) -> None:
        path, capped = self.job_dirs.create(f"w{worker.pid}", self.config.tmp_size)
        worker.tmp_dir, worker.tmp_capped, worker.tmp_size = path, capped, self.config.tmp_size
        worker.on_close.append(lambda: self.job_dirs.remove(path, capped))

    def _empty_tmp_dir(self, worker: WorkerHandle) -> None:
        if worker.tmp_dir is not None:
            self.job_dirs.empty(worker.tmp_dir)

    def job_tmp_dir(self, job: Job, worker: WorkerHandle) -> None:
        """The job's HOME/TMPDIR: its worker's directory, capped at the operator's size or
        half the job's memory limit if that is smaller (its pages count as the job's memory)."""
        assert job.request is not None
        if worker.tmp_dir is None:
            self._give_tmp_dir(worker)
        size = min(self.config.tmp_size, job.request.limits.memory // 2)
        if worker.tmp_capped and worker.tmp_size != size and self.job_dirs.resize(worker.tmp_dir or "", size):
            worker.tmp_size = size
        job.tmp_dir, job.tmp_capped = worker.tmp_dir, worker.tmp_capped
        job.tmp_size = worker.tmp_size if worker.tmp_capped else None

    # -- jobs ---------------------------------------------------------------
    def reuse_key(self, job: Job) -> tuple[Any, ...]:
        r = job.request
        assert r is not None
        return (job.principal, job.agent_ref, repr(sorted(r.lease.items())), r.limits,
                r.lease_constraints.get("expires_at"))

    def job_spec(self, job: Job, egress_port: int | None = None) -> dict[str, Any]:
        r = job.request
        assert r is not None
        return {
            "job_id": job.id, "session_id": job.owner_id, "trace_id": job.trace_id, "agent": job.agent_ref,
            "entry": r.agent.entry, "input": r.input, "lease": r.lease,
            "lease_constraints": r.lease_constraints, "max_result_bytes": self.config.max_result_bytes,
            "max_event_bytes": self.frame_cap - 8192, "chunk_size": self.config.chunk_size,
            "limits": r.limits.as_wire(), "tmp_dir": job.tmp_dir, "tmp_size": job.tmp_size,
            "credentials": job.credentials,
            "egress_port": egress_port,
        }

    def submit(self, session: Session, env: Envelope) -> None:
        if self.draining:
            raise InternalError("the server is shutting down and takes no new jobs", retryable=True,
                                details={"reason": "draining"})
        req = parse_submit(env, self.registry, time.time())
        parent = self._delegating_parent(session.principal, req) if req.parent_job_id is not None else None
        self.admission.check_size(req.limits.memory)  # a job that could never start
        existing = self.jobs.lookup_idempotent(session.principal, req)
        if existing is not None:
            self._replay_accept(session, env.id, existing)
            return
        self.admission.check(session.principal, req.limits.memory)  # overloaded
        if parent is not None:
            self._carve_budget(parent, req)
        job_id = new_id("job")
        credentials = self._issue_credentials(session, req, job_id)
        job = self._accept(session, req, credentials, job_id)
        metrics.job_accepted(job, env, parent)
        if parent is not None:
            self._share_budget(parent, job)
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

    # -- admission (admission.py) ------------------------------------------------
    def _admit(self, job: Job) -> None:
        """After its job.accepted: start the job, or queue it with one `queued` status event."""
        assert job.request is not None
        starts = self.admission.submit(job.id, job.principal, job.request.limits.memory)
        if job.id not in starts:
            self.emit_event(job, "status", {"phase": QUEUED,
                                            "message": f"position {self.admission.position(job.id)}"})
        self._start_jobs(starts)

    def _start_jobs(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = self.jobs.jobs.get(job_id)
            if job is None or job.runner is None or job.done:  # cannot happen: ended jobs leave admission
                log.error("admission started job %s, which is not waiting", job_id)
                self._start_jobs(self.admission.finish(job_id))
                continue
            self._starts += 1
            metrics.job_started(job)
            job.runner.start(self._starts)
            self._spawn(job.runner.run())

    def reconfigure_admission(self, config: Config) -> None:
        """New capacity, queue and quota settings for the jobs that start from now on."""
        self._start_jobs(self.admission.configure(*admission_settings(config)))

    def _accept(self, session: Session, req: SubmitRequest, credentials: list[dict[str, Any]] | None = None,
                job_id: str | None = None) -> Job:
        """The job's record, its runner and its lease expiry; it starts when admitted."""
        layers = self.sandbox_layers
        if self.job_dirs.capped:
            layers = layers + ["tmp-size-cap"]
        if "net.fetch" in req.lease and self.egress_unavailable is None:
            layers = layers + ["egress-proxy"]
        job = self.jobs.create(session.principal, session, req, layers, job_id)
        if credentials:
            job.credentials = credentials
            self.store.add_credentials(job.id, [c["id"] for c in credentials])
        self.store.insert_job(job.id, job.principal, job.owner_id, job.agent_ref, job.status, job.created_at,
                              job.trace_id, job.idempotency_key, job.fingerprint, job.record())
        runner = JobRunner(self, job)
        job.runner = runner
        runner.arm_timers()
        return job

    # -- credentials (protocol.md §8.9) --------------------------------------------
    def _issue_credentials(self, session: Session, req: SubmitRequest,
                           job_id: str) -> list[dict[str, Any]] | None:
        if self.provisioner is None or "provisioned_credentials" not in session.features:
            return None
        expires = req.lease_constraints.get("expires_at")
        try:
            creds = self.provisioner.issue(job_id, session.principal, req.lease, expires)
        except ProvisionerError as e:
            raise InternalError(f"the credential provisioner failed: {e}") from e
        for c in creds:
            if not isinstance(c, dict) or c.get("scheme") != "bearer" or not isinstance(c.get("id"), str) \
                    or not isinstance(c.get("value"), str):
                raise InternalError("the credential provisioner returned a credential that is not bearer "
                                    "{id, scheme, value}")
        return creds

    def rotate_credential(self, job: Job, credential_id: str, new_value: str) -> None:
        """An agent rotates one of its job's credentials; only the submitting session hears of it."""
        if self.provisioner is None:
            raise InvalidRequest("no credential provisioner is configured, so there is nothing to rotate")
        cred = next((c for c in job.credentials if c["id"] == credential_id), None)
        if cred is None:
            raise InvalidRequest(f"credential {credential_id[:128]!r} is not one of this job's")
        try:
            self.provisioner.rotate(credential_id, new_value)
        except ProvisionerError as e:
            raise InternalError(f"rotation failed: {e}") from e
        cred["value"] = new_value
        s = job.owner
        if s is not None:  # never logged for replay, never forwarded (Go delivery)
            body = {"phase": "credential_rotated", "message": credential_id, "id": credential_id,
                    "value": new_value, "details": {"id": credential_id, "value": new_value}}
            s.send_seq(frame("job.event", new_ulid(), {"kind": "status", "ts": now_ts(), "body": body},
                             session_id=s.id, job_id=job.id, trace_id=job.trace_id), job.id, log=False)

    def _revoke(self, credential_id: str, attempt: int) -> None:
        """Revoke now; on failure retry later (50 ms, 250 ms, 1 s, then every 5 s), across restarts."""
        assert self.provisioner is not None
        try:
            self.provisioner.revoke(credential_id)
        except Exception as e:  # a provisioner is third-party code: any failure means retry
            self.store.revocation_attempted(credential_id, revoked=False)
            delay = REVOKE_BACKOFF[min(attempt, len(REVOKE_BACKOFF) - 1)]
            log.warning("revocation of %s failed (%s); retrying in %.2f s", credential_id, e, delay)
            asyncio.get_running_loop().call_later(delay, self._revoke, credential_id, attempt + 1)
            return
        self.store.revocation_attempted(credential_id, revoked=True)

    # -- delegation (protocol.md §8.10, §11.8) ---------------------------------
    def _delegating_parent(self, principal: str, req: SubmitRequest) -> Job:
        """Check a child job against its parent; bound its expiry and limits by the parent's."""
        parent = self.jobs.jobs.get(req.parent_job_id or "")
        if parent is None or parent.principal != principal or parent.done or parent.request is None:
            raise JobNotFound(f"no running parent job {str(req.parent_job_id)[:128]!r}")
        if not lease_allows(parent.lease, "agent.delegate", req.agent.ref):
            raise PermissionDenied(f"the parent's lease does not grant agent.delegate on {req.agent.ref!r}")
        try:  # limits are not patterns: the child's are clamped to the parent's below
            check_subset({c: p for c, p in req.lease.items() if c != LIMITS_KEY},
                         {c: p for c, p in parent.lease.items() if c != LIMITS_KEY}, parent.authority.remaining)
        except LeaseError as e:
            raise LeaseSubsetViolation(f"child lease is not a subset of the parent's: {e}") from e
        limit = parent.authority.expires_at
        if limit is not None and (req.expires_at is None or req.expires_at > limit):
            req.expires_at = limit  # a child never outlives its parent's lease
            req.lease_constraints = {**req.lease_constraints, "expires_at": format_ts(limit)}
        req.limits = within(parent.request.limits, req.limits)  # nor runs under looser limits
        return parent

    @staticmethod
    def _carve_budget(parent: Job, req: SubmitRequest) -> None:
        """The child's budget comes out of the parent's remaining counters."""
        carve = initial_budget(req.lease)
        if carve:
            parent.authority.reserve({c: str(v) for c, v in carve.items()}, time.time())

    @staticmethod
    def _share_budget(parent: Job, child: Job) -> None:
        """A child that asked no budget spends its parent's: the same counters, so that a debit
        by either is seen by both (and by the child's own children that ask none)."""
        if child.authority.initial or not parent.authority.remaining:
            return
        child.authority.remaining = parent.authority.remaining
        child.authority.initial = dict(parent.authority.remaining)  # what it started with

    def _delegated(self, parent: Job, child: Job) -> None:
        parent.children.append(child.id)
        self.emit_event(parent, "delegate", {"child_job_id": child.id, "agent": child.agent_ref,
                                             "lease": child.lease})

    def delegate(self, parent: Job, agent: Any, input: Any, lease: Any) -> str:
        """An agent's job.delegate: a child job in the parent's session, under the same checks."""
        if parent.owner is None:
            raise JobNotFound("the parent job's session is gone")
        payload: dict[str, Any] = {"agent": agent, "input": input, "lease_request": lease or {},
                                   "parent_job_id": parent.id}
        env = Envelope(type="job.submit", id=new_ulid(), payload=payload, trace_id=parent.trace_id)
        req = parse_submit(env, self.registry, time.time())
        self._delegating_parent(parent.principal, req)
        self.admission.check(parent.principal, req.limits.memory)  # children wait their turn too
        self._carve_budget(parent, req)
        child = self._accept(parent.owner, req)
        metrics.job_accepted(child, env, parent)
        self._share_budget(parent, child)
        self._delegated(parent, child)
        self._admit(child)
        return child.id

    def _replay_accept(self, session: Session, request_id: str, job: Job) -> None:
        session.send(frame("job.accepted", new_ulid(), job.accepted_payload(session.flavour, request_id),
                           session_id=session.id, job_id=job.id, trace_id=job.trace_id,
                           extensions=job.accepted_extensions()))
        if job.terminal is not None:
            self._send_terminal(session, job, log=session.id != job.owner_id)
        elif session.id != job.owner_id and not any(w.session is session for w in job.watchers):
            job.watchers.append(Watch(session))  # §11.7: follow the job, without cancel authority

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
                        and owner.seq - owner.last_ack >= self.back_pressure_threshold and "ack" in owner.features:
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

    def finish(self, job: Job, status: str, err: dict[str, Any] | None, *, value: Any = None,
               result_id: str | None = None, result_size: int | None = None,
               usage: dict[str, Any] | None = None) -> None:
        if job.terminal is not None:
            return
        metrics.job_ending(job)
        job.status = status
        job.terminal = {"status": status, "error": err, "value": value, "result_id": result_id,
                        "result_size": result_size, "completed_at": now_ts(), "usage": usage or usage_wire()}
        _log_end(job, status, err, job.terminal["usage"])
        if self.provisioner is not None:  # revoked before the terminal frame leaves (Go's order)
            for cred in job.credentials:
                self._revoke(cred["id"], attempt=0)
            job.credentials = []
        if job.owner is not None:
            self._send_terminal(job.owner, job, log=True)
        for w in job.watchers:
            if w.pending is not None:
                w.pending.append(("terminal", {}))
            else:
                self._send_terminal(w.session, job, log=True)
        job.watchers = [w for w in job.watchers if w.pending is not None]
        self.store.finish_job(job.id, job.status, job.terminal, job.record())
        if value is not None and len(orjson.dumps(value)) > INLINE_KEPT:
            job.terminal = {**job.terminal, "value": None, "value_in_store": True}
        for child_id in job.children:  # children end with their parent
            child = self.jobs.jobs.get(child_id)
            if child is not None and not child.done and child.runner is not None:
                child.runner.request_stop("cancel", f"parent job {job.id} ended")
        job.runner = None
        job.request = None  # the input and the agent spec are no longer needed
        job.tmp_dir = None  # the worker's: emptied when it is kept for another job, removed with it
        self.store.delete_jobs(self.jobs.finished_job(job))
        metrics.job_ended(job)
        self._start_jobs(self.admission.finish(job.id))  # its place, running or waiting, is free
        self._job_ended()

    def _terminal_of(self, job: Job) -> dict[str, Any]:
        t = job.terminal
        assert t is not None
        if t.get("value_in_store"):
            stored = self.store.terminal_of(job.id)
            if stored is not None:
                return stored
        return t

    def _send_terminal(self, s: Session, job: Job, log: bool) -> None:
        t = self._terminal_of(job)
        usage = t.get("usage") or usage_wire()  # (a job restored from an older store has none)
        if t["error"] is None:
            payload = result_payload(t["value"], completed_at=t["completed_at"], flavour=s.flavour,
                                     result_id=t["result_id"], result_size=t["result_size"], usage=usage)
            kind = "job.result"
        else:
            payload = error_payload(t["error"], status=t["status"], completed_at=t["completed_at"],
                                    flavour=s.flavour, usage=usage)
            kind = "job.error"
        env = frame(kind, new_ulid(), payload, session_id=s.id, job_id=job.id, trace_id=job.trace_id,
                    extensions={USAGE_KEY: usage})
        try:
            seq = s.send_seq(env, job.id, log=log)
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

    # -- list and subscribe ---------------------------------------------------
    def list_jobs(self, session: Session, env: Envelope) -> dict[str, Any]:
        p = env.payload
        flt = p.get("filter") or {}
        if not isinstance(flt, dict):
            raise InvalidRequest("session.list_jobs field 'filter' must be an object")
        statuses = flt.get("status")
        if isinstance(statuses, str):
            statuses = [statuses]
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
            if job.principal != session.principal and not session.admin:
                continue
            if statuses is not None and job.status not in statuses:
                continue
            if agent is not None and agent != job.agent_ref and (
                    "@" in agent or job.agent_ref.split("@")[0] != agent):
                continue
            if after is not None or before is not None:
                created = parse_ts(job.created_at).timestamp()
                if (after is not None and created < after) or (before is not None and created > before):
                    continue
            rows.append(job)
        out: list[dict[str, Any]] = []
        size = 256
        end = start
        for job in rows[start:start + limit]:
            entry = {"job_id": job.id, "agent": job.agent_ref, "status": job.status, "lease": job.lease,
                     "created_at": job.created_at, "submitted_at": job.created_at, "trace_id": job.trace_id,
                     "last_event_seq": job.last_seq}
            if job.parent_job_id:
                entry["parent_job_id"] = job.parent_job_id
            if session.admin:
                entry["principal"] = job.principal
            if LIMITS_KEY in job.accepted:  # the effective limits, as job.accepted echoed them
                entry[LIMITS_KEY] = job.accepted[LIMITS_KEY]
            usage = _usage_of(job)
            if usage is not None:
                entry[USAGE_KEY] = usage
            size += len(orjson.dumps(entry)) + 1
            if size > session.frame_cap and out:
                break  # a page must fit one frame: the rest goes to the next page
            out.append(entry)
            end += 1
        payload: dict[str, Any] = {"request_id": env.id, "jobs": out}
        if end < len(rows):
            payload["next_cursor"] = f"o:{end}"
        return frame("session.jobs", new_ulid(), payload, session_id=session.id)

    def subscribe(self, session: Session, env: Envelope, job_id: str) -> None:
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
        frames = self.store.job_frames(job.owner_id, job.id, from_seq) if history else []
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
        if session.id == job.owner_id and job.terminal is None:
            return  # the submitter already gets every frame
        watch = Watch(session, pending=[])
        if job.terminal is not None:
            watch.pending = [("terminal", {})]
        else:
            job.watchers = [w for w in job.watchers if w.session is not session] + [watch]
        asyncio.get_running_loop().call_later(SUBSCRIBE_PAUSE, self._flush_watch, watch, job, replay)

    def _flush_watch(self, watch: Watch, job: Job, replay: list[dict[str, Any]]) -> None:
        """After the pause: history, then whatever arrived meanwhile, then live."""
        s = watch.session
        for f in replay:
            self._forward_replayed(s, job, f)
        pending, watch.pending = watch.pending or [], None
        for type_, payload in pending:
            if type_ == "terminal":
                self._send_terminal(s, job, log=True)
                job.watchers = [w for w in job.watchers if w is not watch]
            else:
                self._forward(watch, job, type_, payload)

    def _forward_replayed(self, s: Session, job: Job, f: dict[str, Any]) -> None:
        if f.get("type") != "job.event":
            return
        s.send_seq(frame("job.event", new_ulid(), f["payload"], session_id=s.id, job_id=job.id,
                         trace_id=job.trace_id), job.id)

    def unsubscribe(self, session: Session, job_id: str) -> None:
        job = self.jobs.jobs.get(job_id)
        if job is not None:
            job.watchers = [w for w in job.watchers if w.session is not session]


def admission_settings(config: Config) -> tuple[int, int, int, int | None, dict[str, int]]:
    budget = config.memory_budget if config.memory_budget is not None else default_memory_budget()
    return config.max_jobs, budget, config.max_queued, config.quota_max_jobs, config.quota_principals


def admission_for(config: Config) -> Admission:
    """The admission rules of `config`; warns of agents whose jobs the memory budget refuses."""
    adm = Admission(*admission_settings(config))
    for a in config.agents:
        if a.limits.memory > adm.memory_budget:
            log.warning("agent %s: its memory limit (%d MiB) is over the memory budget (%d MiB, "
                        "--memory-budget): its jobs are refused unless they ask for less memory",
                        a.ref, a.limits.memory >> 20, adm.memory_budget >> 20)
    log.info("admission: %d jobs at once, memory budget %d MiB, %d may wait", adm.max_jobs,
             adm.memory_budget >> 20, adm.max_queued)
    return adm


def _usage_of(job: Job) -> dict[str, Any] | None:
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


def _restored_job(sj: StoredJob) -> Job:
    rec = sj.record
    job = Job(
        id=sj.job_id, principal=sj.principal, owner_id=sj.session_id, agent_ref=sj.agent,
        trace_id=sj.trace_id, created_at=sj.created_at, lease=rec.get("lease") or {},
        lease_constraints=rec.get("lease_constraints") or {}, parent_job_id=rec.get("parent_job_id"),
        idempotency_key=sj.idempotency_key, fingerprint=sj.fingerprint,
        authority=Authority({k: v for k, v in (rec.get("lease") or {}).items() if k == "cost.budget"}, None),
        accepted=rec.get("accepted") or {}, status=sj.status, terminal=sj.terminal,
    )
    job.last_seq = int(rec.get("last_seq") or 0)
    return job


__all__ = ["Runtime", "STDIO_FRAME_CAP", "WS_FRAME_CAP"]
