"""Drive one job on a worker: send it, pump its frames, answer its calls, end it.

The terminal frame is sent exactly once. A normal end (the agent returned or
raised) sends it at once. A stop (cancel, max_runtime_sec, lease expiry)
decides the terminal at once, tells the worker, gives it `--grace` seconds,
then SIGTERM and SIGKILL (WorkerHandle.stop), and sends the terminal when the
worker is gone: never later than grace + 0.5 s.

Every task of a job belongs to its runner's one task group (`run()`'s): the stopper, the
egress proxy, and, while the worker runs the job, a watch that walks the process tree
(limits and usage, limit_watch.py; where the cgroup has every figure the watch is a timer's
callback instead) and the calls answered later (calls.Later, frame_pump.py), each of those
two in a cancel scope of its own, cancelled when the pump ends. None outlives `run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from shared import pipe_messages as pm
from shared.errors import ARCPError, InternalError
from shared.messages import ERROR, RUNNING, SUCCESS
from shared.pipe_codec import CodecError, encode
from supervisor.sandbox.worker_cgroup import LimitNotApplied
from supervisor.core.lifecycle import Deadline, JobLifecycle, died_terminal
from supervisor.core.usage import UsageMeter, outcome_of, sample_tree, usage_wire
from supervisor.egress.proxy import EgressJob, EgressListener
from supervisor.log_text import block, one_line
from supervisor import metrics
from supervisor.core.authority import Authority
from supervisor.jobs.environments import EnvironmentWorkers
from supervisor.jobs.frame_pump import Died, FramePump
from supervisor.jobs.limit_watch import LimitWatch, limit_fields
from supervisor.jobs.path_checks import PathChecks
from supervisor.jobs.worker_dirs import tmp_size_for
from supervisor.jobs.worker_handle import CGROUP_LINGER, EXIT_WAIT, WorkerHandle, WorkerSpawnError
from supervisor.jobs.worker_rpc import Call, Done, Event, Fail, WorkerFrames, WorkerProtocolError

if TYPE_CHECKING:
    from supervisor.core.jobs import Job
    from supervisor.jobs.host import RunnerHost

log = logging.getLogger("arcp.jobs")


class _TmpDirFailed(Exception):
    """The job's temp dir could not be made (its cause says why)."""


class JobRunner:
    def __init__(self, runtime: RunnerHost, job: Job) -> None:
        self.rt = runtime
        self.job = job
        assert job.request is not None and job.owner is not None
        self.request = job.request
        self.owner = job.owner
        self.worker: WorkerHandle | None = None
        self.workers: EnvironmentWorkers | None = None  # its agent environment's fork server and pool
        self.life = JobLifecycle(job.request.limits.max_runtime, job.request.max_runtime_sec, job.request.expires_at)
        self.started = False  # admitted (see admission.py); until then the job waits in the queue
        self.order = 0  # its place in the start order: jobs waiting for a job uid are served by it
        self._pump_done = asyncio.Event()  # its worker runs no job of it any more (or never did): see run()
        self._sent = False  # its spec went to its worker: a stop from then on tells the worker
        self.started_at: float | None = None  # (monotonic) when admitted
        self.meter: UsageMeter | None = None  # its usage, once it has a worker
        self.limit_watch = LimitWatch(job, job.request, self.life, self._pump_done)
        self._tg: TaskGroup | None = None  # run()'s, while it runs: every task of the job
        self._stopper = False  # a stopper was started: it ends the job
        self._paths = PathChecks(job)
        self.egress: EgressJob | None = None
        self._timers: list[asyncio.TimerHandle] = []
        cap = runtime.frame_cap
        self.frames = WorkerFrames(job.id, runtime.config.max_result_bytes,
                                   max(1024, min(runtime.config.chunk_size * 4 // 3 + 4, cap - 4096)))
        self._frame_pump = FramePump(runtime, job, job.owner, self.frames, self)

    @property
    def limit_logged(self) -> bool:
        """A limit kill was logged when it happened (else the end logs the limit)."""
        return self.limit_watch.logged

    # -- control --------------------------------------------------------------
    def arm_timers(self) -> None:
        """At acceptance: the lease's expiry, which ends a job still waiting to start too."""
        self._arm(self.life.lease_deadline(time.time(), time.monotonic()))

    def _arm(self, deadline: Deadline | None) -> None:
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_at(loop.time() + deadline.at - time.monotonic(), self.request_stop,
                                             deadline.kind, deadline.error.message, deadline.error))

    def start(self, order: int) -> None:
        """Admitted: the runtime ceiling and the client's max_runtime_sec count from now (the
        tighter wins). The caller then runs `run()`."""
        self.started = True
        self.order = order
        self.started_at = time.monotonic()
        job = self.job
        log.info("job started", extra={"job_id": job.id, "session_id": job.owner_id, "principal": job.principal,
                                       "agent": job.agent_ref})
        self._arm(self.life.admitted(self.started_at))

    def refuse(self, error: ARCPError) -> None:
        """End a job that has not started with `error` (its job.accepted could not be sent)."""
        if not self.started and not self.job.done:
            self.life.finished()
            self._finish(ERROR, error.to_wire())

    def request_stop(self, kind: str, reason: str, error: ARCPError | None = None) -> None:
        """Cancel, timeout or expiry: decide the terminal now, end the worker after grace. A job
        still waiting to start ends at once. `error` replaces the terminal error `kind` implies."""
        job = self.job
        if job.done:
            return
        stop = self.life.request_stop(kind, reason, error)
        if stop is None:  # too late: the job's terminal is decided
            return
        if stop.cancelled_frame:
            self.rt.emit_cancelled(job, reason)
        job.status = stop.status  # nothing of the job is sent from here on but its terminal
        if stop.finish_now:  # nothing runs yet: the terminal now
            self._finish(stop.status, stop.error)
        elif self.worker is not None and self._tg is not None:  # the worker is run()'s until it ends
            self._stopper = True
            self._tg.start_soon(self._stopping, self.worker, name=f"stop {job.id}")

    # -- the job's life -------------------------------------------------------
    async def run(self) -> None:
        """The job's life, in one task group: `_run()`, the stopper if a stop comes, the
        job's egress proxy (`EgressJob.run`, started by `_open_egress`; it returns once the
        job's end closes it), a watch that walks the process tree, and calls answered later
        (frame_pump.py). All of them end before this returns."""
        job = self.job
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                try:
                    await self._run()
                except Exception as e:  # a supervisor fault must still end the job, once
                    log.exception("job %s: runner failed", job.id)
                    if self.worker is not None and self.workers is not None:
                        self.workers.pool.retire(self.worker)
                    self._finish(ERROR, InternalError(f"supervisor fault: {type(e).__name__}").to_wire())
                finally:
                    # Its worker runs nothing of this job from here on: its pump ended, or the job
                    # was never sent (a stop, or a failure, while its worker was made ready). A
                    # stopper waiting for the job's end waits no longer.
                    self._pump_done.set()
                    if not self._stopper and self.egress is not None:  # (the end closes it: only if
                        self.egress.close()  # none came, the proxy would wait for it for ever)
        finally:
            self._tg = None
            for t in self._timers:
                t.cancel()

    def _ready_for(self, worker: WorkerHandle) -> bool:
        """A fresh worker whose group already holds this job's limits (the operator's default
        ones, written at spawn) and whose temp dir is already of this job's size."""
        limits = self.request.limits
        cg = worker.cgroup
        if worker.tmp_dir is None or (cg is not None and cg.verified != (limits.memory, limits.max_procs)):
            return False
        return not worker.tmp_capped or worker.tmp_size == tmp_size_for(self.rt.config.tmp_size, limits.memory)

    def _prepare(self, worker: WorkerHandle, meter: UsageMeter | None) -> bool:
        """On a thread, the job's start on its worker: its limits in the worker's cgroup
        (writes read back: 0.1 ms and more, a lower limit reclaims), its temp dir (a mkdir, a
        tmpfs mount or remount), its usage counters' values now. Whether the watch must hold
        the memory limit itself (no memory cgroup). LimitNotApplied, or _TmpDirFailed."""
        watch = True
        if worker.cgroup is not None:
            watch = self.limit_watch.apply(worker, worker.cgroup)
        try:
            self.rt.job_tmp_dir(self.job, worker)
        except OSError as e:
            raise _TmpDirFailed() from e
        if meter is not None:
            meter.begin(self.limit_watch.cpu_base if worker.cgroup is not None and worker.cgroup.counts_cpu else None)
        return watch

    async def _run(self) -> None:
        job = self.job
        try:
            self.workers = workers = await self.rt.environments.get(self.request.agent.environment)
            worker = await workers.pool.acquire(self.rt.reuse_key(job))
        except (WorkerSpawnError, TimeoutError, OSError) as e:
            self._finish(ERROR, InternalError(f"could not start a worker: {e}").to_wire())
            return
        self.worker = worker
        if self.life.stopping:  # stopped while waiting for a worker
            workers.pool.retire(worker)
            self._finish(*self._final_or_internal())
            return
        job.status = RUNNING
        self.rt.store.job_running(job.id)
        # With usage accounting off ([server] usage = false) only the wall time is measured.
        meter = UsageMeter(worker.cgroup, worker.pid, self.started_at or time.monotonic()) \
            if self.rt.config.usage else None
        try:
            if worker.jobs_run or self._ready_for(worker):  # a kept worker (its key includes the
                # limits), or a fresh one readied with this job's limits: its group holds them
                # already and its dir exists at its size; what is left is a few counter reads and
                # one write, microseconds, less than a thread hop (a reload's new tmp size aside)
                watch = self._prepare(worker, meter)
            else:  # one thread hop for the file-system work of a fresh worker's first job
                watch = await anyio.to_thread.run_sync(self._prepare, worker, meter)
        except LimitNotApplied as e:
            self._limit_not_applied(worker, e)
            return
        except _TmpDirFailed as e:
            workers.pool.retire(worker)
            self._finish(ERROR, InternalError(f"could not make the job's temp dir: {e.__cause__}").to_wire())
            return
        egress_port = await self._open_egress(worker) if "net.fetch" in self.request.lease else None
        spec = self.rt.job_spec(job, egress_port)
        if self.rt.uids is not None:
            spec["uid"] = await self._job_uid(worker)
        self.meter = meter
        if self.life.stopping:  # stopped while its worker was made ready (the awaits above): the job
            return  # is not sent, and the stopper ends the worker once this returns (see run)
        assert worker.writer is not None
        worker.writer.write(encode([pm.JOB, spec], pm.MAX_PIPE_FRAME))
        self._sent = True
        metrics.job_phase(job, "agent.run")
        assert self._tg is not None
        self._frame_pump.group = self._tg
        self.limit_watch.start(self._tg, worker, meter, watch)
        try:
            outcome = await self._pump(worker)
        finally:
            self._frame_pump.group = None
            self._pump_done.set()
            self.limit_watch.stop()
            self._frame_pump.cancel_waiting()  # calls still waiting: their job is over, nobody waits for them
        if not self.life.stopping:
            await self._ended(worker, outcome)
        # else the stopper, in run()'s group, sends the terminal once the worker is gone

    def _limit_not_applied(self, worker: WorkerHandle, e: LimitNotApplied) -> None:
        """A layer could not apply a limit: the job does not run, and neither its worker nor
        that cgroup takes another job."""
        log.error("job %s: %s; the worker and its cgroup are retired", self.job.id, e)
        if worker.cgroup is not None:
            worker.cgroup.retired = True
        assert self.workers is not None
        self.workers.pool.retire(worker)
        self._finish(ERROR, InternalError(str(e), retryable=True, details=e.details).to_wire())

    async def _job_uid(self, worker: WorkerHandle) -> int:
        """The worker's uid (taken from the pool at its first job); the job's temp dir is its."""
        uids = self.rt.uids
        assert uids is not None
        if worker.uid is None:
            uid = worker.uid = await uids.acquire(self.order)
            loop = asyncio.get_running_loop()
            sweep = worker.cgroup is None  # no cgroup: find what still runs as the uid by scanning
            worker.exited.add_done_callback(
                lambda _: loop.call_later(CGROUP_LINGER, uids.release, uid, sweep))
        if self.job.tmp_dir is not None:
            os.chown(self.job.tmp_dir, worker.uid, worker.uid)
        return worker.uid

    async def _open_egress(self, worker: WorkerHandle) -> int | None:
        """The job's proxy port on the workers' loopback (the worker's, if it already has one)."""
        job = self.job
        why = self.rt.egress_unavailable
        if why is None and worker.egress is None:
            try:
                assert self.workers is not None
                sock, port = await self.workers.fork_server.listen(worker.pid)
                listener = EgressListener(sock, port)
                await listener.start()
                worker.egress = listener
            except OSError as e:
                why = f"no proxy port: {e}"
        if why is not None or worker.egress is None:
            self._event(Event("log", {"level": "warn", "message": f"net.fetch is granted but the job has no "
                                                                  f"network: {why}"}))
            return None
        self.egress = EgressJob(job.id, job.authority, self._egress_event, self.rt.config.egress_header_timeout)
        worker.egress.job = self.egress
        assert self._tg is not None
        self._tg.start_soon(self.egress.run, name=f"egress {job.id}")
        return worker.egress.port

    def _egress_event(self, kind: str, body: dict[str, Any]) -> None:
        self._event(Event(kind, body))

    async def _ended(self, worker: WorkerHandle, outcome: Any) -> None:
        job = self.job
        assert self.workers is not None
        pool = self.workers.pool
        if isinstance(outcome, Done | Fail) and self.limit_watch.cpu_over(worker):
            # The job's tree passed its CPU time between two reads, or since the last one.
            await worker.kill(1.0)
            outcome = Died()
        if isinstance(outcome, Done | Fail):  # its terminal is decided: a stop from now on comes too late
            self.life.end_reported()
            await self._last_sample(worker)
        if isinstance(outcome, Done):
            await pool.release(worker, self.rt.reuse_key(job), outcome.left)
            result_id = size = None
            s = self.frames.stream
            if s is not None:
                result_id, size = s.result_id, s.size
            self._finish(SUCCESS, None, value=outcome.value, result_id=result_id, result_size=size)
        elif isinstance(outcome, Fail):
            if outcome.traceback:
                log.warning("job %s: agent raised\n%s", job.id, block(outcome.traceback))  # the worker's text
            await pool.release(worker, self.rt.reuse_key(job), outcome.left)
            self._finish(ERROR, outcome.error)
        elif isinstance(outcome, WorkerProtocolError | CodecError):
            log.error("job %s: worker %d sent an invalid frame: %s", job.id, worker.pid, one_line(str(outcome), 1024))
            await worker.kill(EXIT_WAIT)
            self._finish(ERROR, InternalError(f"worker sent an invalid frame: {outcome}").to_wire())
        else:  # the pipe closed without an outcome: the worker died
            oom = worker.cgroup is not None and worker.cgroup.memory_exceeded()
            await worker.kill(1.0)
            watched = self.limit_watch
            e = watched.cpu_unreadable
            self._finish(*died_terminal(
                self.request.limits.as_wire(), memory_exceeded=watched.memory_exceeded, oom=oom,
                cpu_unreadable=(str(e), e.details) if e is not None else None, cpu_exceeded=watched.cpu_exceeded,
                killed_by_sigxcpu=worker.exited.done() and _killed_by(worker.exited.result(), signal.SIGXCPU),
                exit_reason=worker.exit_reason()))

    async def _last_sample(self, worker: WorkerHandle) -> None:
        """The process tree's last sample, for the usage figures that come from it (on a thread)."""
        meter = self.meter
        if meter is not None and meter.needs_tree and worker.alive:
            meter.sample(await anyio.to_thread.run_sync(sample_tree, meter.pid))

    async def _stopping(self, worker: WorkerHandle) -> None:
        """Tell the worker, then end it (WorkerHandle.stop): the agent has `grace` to unwind and
        the worker to report its end (the pump ends), then SIGTERM and SIGKILL; then the terminal.

        A stop that comes while the worker is made ready for the job (before its spec is sent)
        tells the worker nothing: a worker takes a cancel for the job it has (one that comes
        before its job would be lost), and `_run()` does not send the job after a stop. The wait
        for the job's end is then the set-up's: `run()` sets `_pump_done` once `_run()` is over."""
        try:
            assert worker.writer is not None
            if self._sent:
                with contextlib.suppress(OSError, RuntimeError, CodecError):
                    worker.writer.write(encode([pm.CANCEL, self.life.stop.kind if self.life.stop else "cancel"]))
            await worker.stop(self.rt.config.grace, ended=self._pump_done, kill_wait=EXIT_WAIT)
        except Exception:  # the terminal still goes, once
            log.exception("job %s: stopping its worker failed", self.job.id)
            worker.signal(signal.SIGKILL)
            worker.close_pipe()
        finally:
            self._finish(*self._final_or_internal())

    def _final_or_internal(self) -> tuple[str, dict[str, Any]]:
        stop = self.life.stop
        return (stop.status, stop.error) if stop is not None else (ERROR, InternalError("job stopped").to_wire())

    # -- frames from the worker (frame_pump.py) ----------------------------------
    async def _pump(self, worker: WorkerHandle) -> Any:
        return await self._frame_pump.run(worker)

    def _event(self, ev: Event) -> None:
        self._frame_pump.event(ev)

    def _answer(self, writer: asyncio.StreamWriter, call: Call) -> None:
        self._frame_pump.answer(writer, call)

    # what answering a call needs of the runner (calls.CallHost)
    @property
    def authority(self) -> Authority:
        return self.job.authority

    @property
    def lease(self) -> dict[str, list[str]]:
        return self.request.lease

    def emit(self, kind: str, body: dict[str, Any]) -> None:
        self._event(Event(kind, body))

    async def check_path(self, cap: str, target: str) -> None:
        await self._paths.check(cap, target, self.worker)

    def delegate(self, agent: str, child_input: Any, lease: Any) -> str:
        return self.rt.delegate(self.job, agent, child_input, lease)

    async def rotate_credential(self, credential_id: str, value: str) -> None:
        await self.rt.rotate_credential(self.job, credential_id, value)

    # -- the end ------------------------------------------------------------------
    def _finish(self, status: str, err: dict[str, Any] | None, *, value: Any = None,
                result_id: str | None = None, result_size: int | None = None) -> None:
        self.life.finished()
        for t in self._timers:
            t.cancel()
        net = (0, 0)
        if self.egress is not None:  # its last byte counts, then its connections are cut
            self.egress.close()
            net = (self.egress.bytes_in, self.egress.bytes_out)
            if self.worker is not None and self.worker.egress is not None and self.worker.egress.job is self.egress:
                self.worker.egress.job = None
            self.egress = None
        usage = self._usage(*net)
        if not self.limit_logged and outcome_of(status, err) == "limit":
            details = (err or {}).get("details") or {}
            log.warning("job %s: ended by its %s limit (%s)", self.job.id, details.get("limit"), details.get("value"),
                        extra=limit_fields(self.job.id, str(details.get("limit")), details.get("value")))
        self.rt.finish(self.job, status, err, value=value, result_id=result_id, result_size=result_size,
                       usage=usage)

    def _usage(self, net_in: int, net_out: int) -> dict[str, Any]:
        """What the job has used so far (at its end: all it used)."""
        now = time.monotonic()
        meter = self.meter
        if meter is None:  # it never had a worker, or usage accounting is off
            return usage_wire(now - self.started_at if self.started_at is not None else 0.0,
                              net_bytes_in=net_in, net_bytes_out=net_out)
        return meter.read(now, net_in, net_out)  # the tree as last sampled (the watch, _last_sample)

    def usage_so_far(self) -> dict[str, Any]:
        """For `session.list_jobs`: the figures of a running job until now."""
        e = self.egress
        return self._usage(e.bytes_in, e.bytes_out) if e is not None else self._usage(0, 0)


def _killed_by(status: int, sig: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
