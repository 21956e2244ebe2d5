"""The runtime: the composition root. It builds the job table, the store, the session
table, the delivery of job frames, the job service, the fork server and the worker
pool, owns the task group every job, worker spawn, sweep and retry runs in, and
carries a session's requests to the part that handles them."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import anyio
from anyio.abc import TaskGroup

from shared.envelope import Envelope
from shared.messages import FEATURES
from shared.seccomp import seccomp_available
from supervisor import metrics
from supervisor.async_library import declare_asyncio
from supervisor.cluster.node import Cluster
from supervisor.config import DEFAULT_ENVIRONMENT, AgentEnvironment, Config, ConfigError, default_memory_budget
from supervisor.core.admission import Admission
from supervisor.core.jobs import Job, JobTable, SubmitRequest
from supervisor.core.listing import list_jobs
from supervisor.core.registry import AgentRegistry
from supervisor.core.requests import Cancel, ListJobs, Request, Submit, Subscribe, Unsubscribe
from supervisor.core.session import CloseTransport, Session
from supervisor.jobs.credentials import Provisioner, load_provisioner
from supervisor.jobs.delivery import Delivery
from supervisor.jobs.provisioning import Credentials
from supervisor.jobs.runner import JobRunner
from supervisor.jobs.service import JobService, usage_of
from supervisor.jobs.worker_dirs import WorkerDirs, tmp_size_for
from supervisor.jobs.environments import EnvironmentWorkers, WorkerEnvironments
from supervisor.jobs.fork_server import ForkServer, ForkServerStartError
from supervisor.jobs.worker_handle import WorkerHandle, WorkerSpawnError
from supervisor.jobs.pool import WorkerPool
from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.worker_cgroup import LimitNotApplied
from supervisor.sandbox.host import job_uid_range, worker_env
from supervisor.sandbox.job_dirs import JobDirs
from supervisor.sandbox.job_uids import HOST_CLAIMS, HostUidClaims, UidPool
from supervisor.sandbox.worker_runtime import WorkerRuntime, supervisor_package_dirs
from supervisor.server.sessions import SessionTable
from supervisor.state.base import StateStore, StoredJob, StoreError
from supervisor.state.postgres import PostgresStore
from supervisor.state.sqlite import SqliteStore
from supervisor.core.authority import Authority

log = logging.getLogger("arcp.runtime")
WS_FRAME_CAP = 1024 * 1024 - 4096
STDIO_FRAME_CAP = 64 * 1024 - 1024
SWEEP_INTERVAL = 5.0


class Runtime:
    def __init__(self, config: Config, frame_cap: int = WS_FRAME_CAP, *, lazy_environments: bool = False) -> None:
        """`lazy_environments`: agent environments' fork servers start on first use, not at
        start (for `doctor`, which reports each one that fails instead of stopping)."""
        self.config = config
        self._lazy_environments = lazy_environments
        self.frame_cap = frame_cap
        self.registry = AgentRegistry(config.agents, config.defaults)
        self.jobs = JobTable(config.retention_jobs, config.retention_seconds)
        self.job_uid_range = job_uid_range(config)  # (a ConfigError before anything starts)
        self.store: StateStore = store_for(config)
        self.cgroups = Cgroups()
        self.job_dirs = JobDirs(size=config.tmp_size, shared=self.job_uid_range is not None)
        self.worker_dirs = WorkerDirs(self.job_dirs, lambda: self.config.tmp_size, self.spawn)
        self.uids: UidPool | None = None  # job uids, once the fork server has confirmed them
        self.worker_runtime = WorkerRuntime()  # what jobs import of the supervisor's, copied at start
        self._hidden_packages = supervisor_package_dirs()  # installed packages jobs must not see
        self._seccomp = seccomp_available()  # so every fork server must build the seccomp filter
        self.environments = WorkerEnvironments(self._environment_workers, self._check_environment)
        self.fork_server = self.environments.default.fork_server  # the default agent environment's
        self.admission = admission_for(config)
        # job.accepted's sandbox list, by whether the job has net.fetch: decided at start (from
        # what the fork server set up); no job is accepted before
        self._job_layers: dict[bool, list[str]] = {}
        provisioner = _provisioner(config)
        # model.use and provisioned_credentials are offered only with a provisioner (protocol.md §4.3)
        self.features = FEATURES + (("model.use", "provisioned_credentials") if provisioner else ())
        self.egress_unavailable: str | None = "not started"  # why net.fetch jobs get no proxy, or None
        self._tg: TaskGroup | None = None
        self._stack = AsyncExitStack()
        self.delivery = Delivery(self.jobs, self.store, config.back_pressure_threshold, frame_cap, self.spawn)
        self.credentials = Credentials(provisioner, self.store, self.spawn) if provisioner else None
        self.service = JobService(self.jobs, self.store, self.delivery, self.admission, self.credentials,
                                  self.spawn, lambda: self.registry, self._layers, self._runner)
        self.sessions_table = SessionTable(lambda: self.config, self.store, self.jobs, self.delivery,
                                           self.features, lambda: self.registry.inventory())
        self.sessions = self.sessions_table.sessions
        # Several processes on one database: sessions, cancels, subscriptions and listings reach
        # across them (supervisor/cluster/)
        self.cluster = Cluster(self.store, lambda: self.config, self.sessions, self.jobs, self.delivery, self.spawn,
                               _restored_job) if isinstance(self.store, PostgresStore) else None
        self.sessions_table.directory = self.cluster
        if self.cluster is not None:  # one job per key across the processes
            self.service.claim_keys = True
            self.service.replay_held = self.cluster.replay_held
        # What a job runner calls (supervisor/jobs/host.py)
        self.emit_event = self.delivery.emit_event
        self.emit_cancelled = self.delivery.emit_cancelled
        self.finish = self.service.finish
        self.delegate = self.service.delegate
        self.job_tmp_dir = self.worker_dirs.for_job

    # -- start and close ----------------------------------------------------------
    async def __aenter__(self) -> Runtime:
        declare_asyncio()  # on its owner's loop thread (`run`, `doctor`): its callbacks start tasks too
        await self._stack.__aenter__()
        try:
            await self._start()
        except BaseException:
            try:  # what started goes: the fork server and its workers, cgroups, job dirs, the store
                with anyio.CancelScope(shield=True):
                    await self._close()
            finally:
                await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._close()
        finally:
            await self._stack.aclose()

    async def _start(self) -> None:
        self._stack.push_async_callback(self.store.close)
        self._restore(*await self.store.recover(self.config.retention_jobs, self.config.retention_seconds))
        self._tg = await self._stack.enter_async_context(anyio.create_task_group())
        if self.cluster is not None:
            self.cluster.start()
        if self.credentials is not None:
            await self.credentials.revoke_left_behind(shared=self.cluster is not None)
            if self.cluster is not None:  # what another process finished, or was lost with, unrevoked
                self.spawn(self._sweep_credentials)
        self.fork_server.runtime_dir = await anyio.to_thread.run_sync(self.worker_runtime.build)
        self._stack.callback(self.worker_runtime.close)
        await self._start_environments()
        if self.job_uid_range is not None:
            self.uids = UidPool(*self.job_uid_range, claims=_host_uid_claims())
            log.info("jobs run as uids %d-%d%s", *self.job_uid_range,
                     f" (a private mount view opens {', '.join(self.fork_server.opened)})"
                     if self.fork_server.opened else "")
        else:
            log.warning("jobs run under the supervisor's own uid %d (--allow-shared-uid): they can change "
                        "its resource limits and scheduling only where seccomp refuses it, and the "
                        "files it owns outside their lease keep only Landlock's protection", os.geteuid())
        from supervisor.sandbox import layers  # the same decision as `doctor`'s, from what was set up

        decided = layers.decide(layers.Host.read(), layers.confirmed(self.fork_server, self.cgroups, self.job_dirs))
        self.egress_unavailable = decided.egress_unavailable
        self._job_layers = {fetch: decided.for_job(fetch) for fetch in (False, True)}
        for warning in decided.warnings:
            log.warning("%s", warning)
        self.spawn(self._sweep_loop)
        metrics.set_enabled(self.config.metrics)
        metrics.attach(self)
        if self.config.metrics:
            self.spawn(metrics.probe_lag)

    async def _close(self) -> None:
        """The end: whatever a drain left running is cancelled (its terminal kept for its
        session) and waited for (bounded), then the workers, the fork server and the job
        dirs go; last, the task group's remaining tasks (sweeps, retries) are cancelled and
        waited for, and the store closes when the stack unwinds."""
        self.begin_drain()
        metrics.detach(self)
        self.service.cancel_jobs("server shutting down")
        await self.service.wait_jobs(self.config.grace + 1.0)
        await self.environments.aclose()
        if self.uids is not None and self.uids.claims is not None:
            self.uids.claims.close()  # (the workers are gone: their uids are free on this host)
        self.cgroups.close()
        self.job_dirs.close()
        if self._tg is not None:
            self._tg.cancel_scope.cancel()

    async def _sweep_credentials(self) -> None:
        """Every node timeout, as long as the runtime runs (several processes on one database):
        what jobs finished at least a node timeout ago left unrevoked."""
        assert self.credentials is not None
        while True:
            await anyio.sleep(self.config.node_timeout)
            try:
                await self.credentials.sweep(self.config.node_timeout)
            except StoreError as e:  # the database away: the next sweep
                log.warning("credential sweep: %s", e)

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run `fn` in the runtime's task group (a job, a retry, a subscriber's history, a
        removal); False, and `fn` is not run, once the group has ended (the runtime closed). A
        failure of one is logged with its traceback and ends only that task: the group, and
        the server with it, go on."""
        if self._tg is None or self._tg.cancel_scope.cancel_called:
            log.debug("not started, the runtime has closed: %s", getattr(fn, "__qualname__", fn))
            return False

        async def guarded() -> None:
            try:
                await fn()
            except Exception:
                log.exception("task %s failed", getattr(fn, "__qualname__", fn))

        self._tg.start_soon(guarded, name=getattr(fn, "__qualname__", None))
        return True

    def _restore(self, stored: list[StoredJob], interrupted: int) -> None:
        for sj in stored:
            self.jobs.add(_restored_job(sj))
        if stored:
            log.info("restored %d finished jobs (%d were running and ended with INTERNAL_ERROR)",
                     len(stored), interrupted)

    async def _sweep_loop(self) -> None:
        while True:
            await anyio.sleep(SWEEP_INTERVAL)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """Forget sessions past their resume window and jobs past retention."""
        self.sessions_table.sweep(now)
        self.store.delete_jobs(self.jobs.expire(now))
        self.environments.sweep_cgroups()

    # -- agent environments ---------------------------------------------------------
    async def _start_environments(self) -> None:
        """The default environment's fork server and pool, then every configured agent
        environment's; one that cannot start ends the start, naming its agents."""
        assert self._tg is not None
        envs = [] if self._lazy_environments else list(dict.fromkeys(a.environment for a in self.config.agents))
        for env in [DEFAULT_ENVIRONMENT, *[e for e in envs if not e.is_default]]:
            try:
                await self.environments.start_one(self._tg, env)
            except WorkerSpawnError as e:
                if env.is_default:
                    raise ConfigError(str(e)) from e
                names = ", ".join(a.ref for a in self.config.agents if a.environment == env)
                raise ConfigError(f"agent {names} (on {env.describe()}): cannot start: {e}") from e

    def _environment_workers(self, env: AgentEnvironment) -> EnvironmentWorkers:
        """An agent environment's fork server (on its interpreter, compiling its agents'
        modules ahead) and its warm pool (never more warm workers than jobs may run at once)."""
        modules = sorted({a.entry.split(":", 1)[0] for a in self.config.agents if a.environment == env})
        fs = ForkServer(worker_env(), os.getcwd(), modules, self.cgroups, job_uids=self.job_uid_range is not None,
                        python=env.python, import_path=env.path, runtime=self.worker_runtime.path,
                        hide=self._hidden_packages, label=env.describe())
        pool = WorkerPool(fs, min(self.config.warm_workers, self.config.max_jobs), self.config.reuse_workers,
                          on_spawn=self._ready_worker, on_keep=self.worker_dirs.empty)
        return EnvironmentWorkers(env, fs, pool)

    def _ready_worker(self, worker: WorkerHandle) -> None:
        """On a thread, a new worker before it waits in the pool: its temp dir, and its group
        set to the operator's default limits, which most jobs have. A first job with those
        limits finds them there (written and read back) and starts without a thread hop
        (jobs/runner.py); a job with others has them written at its start, as before."""
        limits = self.config.limits
        self.worker_dirs.give(worker, tmp_size_for(self.config.tmp_size, limits.memory))
        if worker.cgroup is not None:
            try:
                worker.cgroup.set_limits(limits.memory, limits.max_procs)
            except LimitNotApplied as e:  # the job's start writes them again, and reports it
                log.debug("worker %d: the default limits are not in its group yet: %s", worker.pid, e)

    def _check_environment(self, workers: EnvironmentWorkers) -> None:
        """ForkServerStartError unless this environment's fork server set up job uids (when
        required: never a fallback to the supervisor's uid) and the seccomp filter (where the
        host has it)."""
        fs = workers.fork_server
        if self.job_uid_range is not None and not fs.job_uids:
            raise ForkServerStartError(f"jobs cannot be given uids of their own: "
                                       f"{fs.job_uids_error or 'the fork server could not set them up'}")
        if self._seccomp and not fs.seccomp:  # never a job without the filter doctor promised
            raise ForkServerStartError("its fork server could not build the seccomp filter (pyseccomp or "
                                       "libseccomp does not load on that interpreter)")
        if fs.hide_error:
            log.warning("%s: jobs can read the installed packages in %s (not on their import path): %s",
                        fs.label, ", ".join(fs.not_hidden) or "?", fs.hide_error)

    # -- drain (SIGTERM, SIGINT) ------------------------------------------------
    @property
    def draining(self) -> bool:
        return self.service.draining

    def begin_drain(self) -> None:
        """Refuse new sessions and submits from now on; the fork server is not restarted."""
        self.service.draining = True
        self.environments.begin_drain()

    def unfinished_jobs(self, owner_id: str | None = None) -> list[Job]:
        return self.service.unfinished_jobs(owner_id)

    async def wait_jobs(self, timeout: float | None, *, owner_id: str | None = None,
                        hurry: anyio.Event | None = None) -> bool:
        return await self.service.wait_jobs(timeout, owner_id=owner_id, hurry=hurry)

    def cancel_jobs(self, reason: str) -> None:
        self.service.cancel_jobs(reason)

    def close_sessions(self, reason: str = "server shutting down") -> int:
        return self.sessions_table.close_all(reason)

    def reconfigure_admission(self, config: Config) -> None:
        """New capacity, queue and quota settings for the jobs that start from now on."""
        self.service.start_jobs(self.admission.configure(*admission_settings(config)))

    # -- connections (supervisor/server/host.py) -------------------------------------
    def open_session(self, hello: Envelope, principal: str, frame_cap: int, close: CloseTransport) -> Session:
        return self.sessions_table.open(hello, principal, frame_cap, close)

    async def resume_session(self, hello: Envelope, principal: str, frame_cap: int,
                             close: CloseTransport) -> tuple[Session, int]:
        return await self.sessions_table.resume(hello, principal, close, frame_cap)

    def session_detached(self, session: Session) -> None:
        self.sessions_table.detached(session)

    async def handle(self, session: Session, request: Request) -> None:
        """Carry out one of a session's requests; errors go back to the session."""
        cluster = self.cluster
        if isinstance(request, Submit):
            await self.service.submit(session, request.env)
        elif isinstance(request, Cancel):
            if cluster is not None and request.job_id not in self.jobs.jobs:
                await cluster.cancel(session, request)
            else:
                self.service.cancel(session, request)
        elif isinstance(request, ListJobs):
            jobs = self.jobs.jobs.values() if cluster is None else await cluster.all_jobs(session)
            session.send(list_jobs(jobs, session, request.env, usage_of))
        elif isinstance(request, Subscribe):
            if cluster is not None and request.job_id not in self.jobs.jobs:
                await cluster.subscribe(session, request.env, request.job_id)
            else:
                await self.delivery.subscribe(session, request.env, request.job_id)
                job = self.jobs.jobs.get(request.job_id)
                if cluster is not None and job is not None:
                    cluster.followed(session, job)
        elif isinstance(request, Unsubscribe):
            if cluster is not None and request.job_id not in self.jobs.jobs:
                await cluster.unsubscribe(session, request.job_id)
            else:
                self.delivery.unsubscribe(session, request.job_id)
                if cluster is not None:
                    cluster.unfollowed(session, request.job_id)

    # -- what a job runner asks (supervisor/jobs/host.py) ---------------------------------
    def _runner(self, job: Job) -> JobRunner:
        return JobRunner(self, job)

    def _layers(self, req: SubmitRequest) -> list[str]:
        """job.accepted's sandbox list for a job of this request (decided at start)."""
        return self._job_layers["net.fetch" in req.lease]

    def reuse_key(self, job: Job) -> tuple[Any, ...]:
        r = job.request
        assert r is not None
        return (job.principal, job.agent_ref, r.agent.environment, repr(sorted(r.lease.items())), r.limits,
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

    async def rotate_credential(self, job: Job, credential_id: str, new_value: str) -> None:
        """An agent rotates one of its job's credentials; only the submitting session hears of it."""
        if self.credentials is None:
            from shared.errors import InvalidRequest
            raise InvalidRequest("no credential provisioner is configured, so there is nothing to rotate")
        await self.credentials.rotate(job, credential_id, new_value)
        self.delivery.credential_rotated(job, credential_id, new_value)


def store_for(config: Config) -> StateStore:
    """PostgreSQL with --state-url (several processes may share it), else SQLite."""
    if config.state_url:
        return PostgresStore(config.state_url, config.session_log_bytes, node_id=config.node_id,
                             node_heartbeat=config.node_heartbeat, node_timeout=config.node_timeout,
                             resume_window=config.resume_window)
    return SqliteStore(config.state_dir, config.session_log_bytes)


def _host_uid_claims() -> HostUidClaims | None:
    """The host's uid claims, so that another supervisor on this host (whose job uid range
    overlaps ours: the default one, say) never runs a job under a uid a job of ours has."""
    try:
        return HostUidClaims()
    except OSError as e:
        log.warning("job uids are not claimed host-wide (%s: %s): another supervisor on this host with an "
                    "overlapping [sandbox] job_uids range could give its jobs the uids ours have",
                    HOST_CLAIMS, e)
        return None


def _provisioner(config: Config) -> Provisioner | None:
    if not config.credentials_provisioner:
        return None
    try:
        return load_provisioner(config.credentials_provisioner, config.credentials_options)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise ConfigError(f"config key credentials.provisioner: cannot load "
                          f"{config.credentials_provisioner!r}: {e}") from e


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
