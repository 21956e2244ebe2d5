"""Drive one job on a worker: send it, pump its frames, answer its calls, end it.

The terminal frame is sent exactly once. A normal end (the agent returned or
raised) sends it at once. A stop (cancel, max_runtime_sec, lease expiry)
decides the terminal at once, tells the worker, gives it `--grace` seconds,
then SIGTERM and SIGKILL, and sends the terminal when the worker is gone:
never later than grace + 0.5 s.
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
from shared.errors import (
    ARCPError, Cancelled, InternalError, InvalidRequest, LeaseExpired, PermissionDenied, Timeout,
)
from shared.ids import new_id
from shared.lease import PATH_CAPABILITIES, clean_path, lease_allows
from shared.messages import CANCELLED, ERROR, RUNNING, SUCCESS, TIMED_OUT
from shared.pipe_codec import CodecError, FrameDecoder, encode
from supervisor.sandbox.cgroups import LimitNotApplied
from supervisor.core.usage import UsageMeter, outcome_of, sample_tree, usage_wire
from supervisor.egress.proxy import EgressJob, EgressListener
from supervisor.log_text import block, one_line
from supervisor import metrics
from supervisor.sandbox import path_resolve
from supervisor.core.authority import shown
from supervisor.jobs.workers import CGROUP_LINGER, WorkerHandle, WorkerSpawnError
from supervisor.jobs.worker_rpc import Call, Done, Event, Fail, WorkerFrames, WorkerProtocolError, check_call

if TYPE_CHECKING:
    from supervisor.core.jobs import Job
    from supervisor.runtime import Runtime

log = logging.getLogger("arcp.jobs")
KILL_SLACK = 0.2  # between SIGTERM and SIGKILL
EXIT_WAIT = 0.25  # after SIGKILL, for the reaper's word
POLL_INTERVAL = 0.1  # seconds between looks at a running job: limits the kernel does not hold alone, usage
MAX_PATH_CHECKS = 256  # fs.* validate_lease_op calls of one job waiting for their answer


class _Died:
    pass


class JobRunner:
    def __init__(self, runtime: Runtime, job: Job) -> None:
        self.rt = runtime
        self.job = job
        assert job.request is not None and job.owner is not None
        self.request = job.request
        self.owner = job.owner
        self.worker: WorkerHandle | None = None
        self.stop_kind: str | None = None
        self.started = False  # admitted (see admission.py); until then the job waits in the queue
        self.order = 0  # its place in the start order: jobs waiting for a job uid are served by it
        self._pump_done = asyncio.Event()
        self._memory_exceeded = False
        self._watch_memory = False  # no memory cgroup: the poll holds the memory limit
        self._poll_timer: asyncio.TimerHandle | None = None
        self.started_at: float | None = None  # (monotonic) when admitted
        self.meter: UsageMeter | None = None  # its usage, once it has a worker
        self.limit_logged = False  # a limit kill was logged when it happened
        self._cpu_base = 0  # the group's CPU time (ns) when the job started: a recycled group has run others
        self._cpu_exceeded = False
        self._cpu_unreadable: LimitNotApplied | None = None
        self._stopper: asyncio.Task[None] | None = None
        self._final: tuple[str, dict[str, Any]] | None = None
        self.egress: EgressJob | None = None
        self._egress_tasks: TaskGroup | None = None  # holds the egress proxy's task while the job runs
        self._timers: list[asyncio.TimerHandle] = []
        cap = runtime.frame_cap
        self.frames = WorkerFrames(job.id, runtime.config.max_result_bytes,
                                   max(1024, min(runtime.config.chunk_size * 4 // 3 + 4, cap - 4096)))

    # -- control --------------------------------------------------------------
    def arm_timers(self) -> None:
        """At acceptance: the lease's expiry, which ends a job still waiting to start too."""
        loop = asyncio.get_running_loop()
        req = self.request
        if req.expires_at is not None:
            self._timers.append(loop.call_at(loop.time() + max(0.0, req.expires_at - time.time()),
                                             self.request_stop, "expired", "lease expired during execution"))

    def start(self, order: int) -> None:
        """Admitted: the runtime ceiling and the client's max_runtime_sec count from now (the
        tighter wins). The caller then runs `run()`."""
        self.started = True
        self.order = order
        self.started_at = time.monotonic()
        job = self.job
        log.info("job started", extra={"job_id": job.id, "session_id": job.owner_id, "principal": job.principal,
                                       "agent": job.agent_ref})
        ceiling = self.request.limits.max_runtime
        asked = self.request.max_runtime_sec
        err: ARCPError
        if asked and asked < ceiling:
            after, err = asked, Timeout(f"job exceeded max_runtime_sec={asked}")
        else:
            after, err = ceiling, Timeout(f"runtime limit {ceiling} s exceeded", retryable=False,
                                          details={"limit": "runtime_sec", "value": ceiling})
        self._timers.append(asyncio.get_running_loop().call_later(
            after, self.request_stop, "timeout", err.message, err))

    def refuse(self, error: ARCPError) -> None:
        """End a job that has not started with `error` (its job.accepted could not be sent)."""
        if not self.started and not self.job.done:
            self.stop_kind = "refused"
            self._finish(ERROR, error.to_wire())

    def request_stop(self, kind: str, reason: str, error: ARCPError | None = None) -> None:
        """Cancel, timeout or expiry: decide the terminal now, end the worker after grace. A job
        still waiting to start ends at once. `error` replaces the terminal error `kind` implies."""
        job = self.job
        if job.done or self.stop_kind is not None:
            return
        self.stop_kind = kind
        err: ARCPError
        if kind == "cancel":
            status, err = CANCELLED, Cancelled(reason)
        elif kind == "timeout":
            status, err = TIMED_OUT, Timeout(reason)
        else:
            status, err = ERROR, LeaseExpired(reason)
        self._final = (status, (error or err).to_wire())
        if kind == "cancel":
            self.rt.emit_cancelled(job, reason)
        job.status = status  # nothing of the job is sent from here on but its terminal
        if not self.started:  # nothing runs yet: the terminal now
            self._finish(*self._final)
        elif self.worker is not None:
            self._stopper = asyncio.get_running_loop().create_task(self._stopping(self.worker))

    # -- the job's life -------------------------------------------------------
    async def run(self) -> None:
        """The job's life, in a task group that also holds its egress proxy (`EgressJob.run`,
        started by `_open_egress`); once the life is over, so is the proxy."""
        async with anyio.create_task_group() as tasks:
            self._egress_tasks = tasks
            await self._life()
            tasks.cancel_scope.cancel()

    async def _life(self) -> None:
        job = self.job
        try:
            await self._run()
        except Exception as e:  # a supervisor fault must still end the job, once
            log.exception("job %s: runner failed", job.id)
            if self.worker is not None:
                self.rt.pool.retire(self.worker)
            self._finish(ERROR, InternalError(f"supervisor fault: {type(e).__name__}").to_wire())
        finally:
            for t in self._timers:
                t.cancel()

    async def _run(self) -> None:
        job = self.job
        try:
            worker = await self.rt.pool.acquire(self.rt.reuse_key(job))
        except (WorkerSpawnError, TimeoutError, OSError) as e:
            self._finish(ERROR, InternalError(f"could not start a worker: {e}").to_wire())
            return
        self.worker = worker
        if self.stop_kind is not None:  # stopped while waiting for a worker
            self.rt.pool.retire(worker)
            self._finish(*self._final_or_internal())
            return
        job.status = RUNNING
        watch = True  # the supervisor's own memory check, where no memory cgroup enforces it
        if worker.cgroup is not None:
            try:
                worker.cgroup.set_limits(self.request.limits.memory, self.request.limits.max_procs)
            except LimitNotApplied as e:
                self._limit_not_applied(worker, e)
                return
            watch = not worker.cgroup.limits_memory
            if worker.cgroup.counts_cpu:  # CPU time of the whole tree; RLIMIT_CPU stays, per process
                try:
                    self._cpu_base = worker.cgroup.cpu_usage_ns()
                except (OSError, ValueError) as e:
                    self._limit_not_applied(worker, self._cpu_limit_error(worker, e))
                    return
        try:
            self.rt.job_tmp_dir(job, worker)
        except OSError as e:
            self.rt.pool.retire(worker)
            self._finish(ERROR, InternalError(f"could not make the job's temp dir: {e}").to_wire())
            return
        egress_port = await self._open_egress(worker) if "net.fetch" in self.request.lease else None
        spec = self.rt.job_spec(job, egress_port)
        if self.rt.uids is not None:
            spec["uid"] = await self._job_uid(worker)
        self.meter = UsageMeter(worker.cgroup, worker.pid, self.started_at or time.monotonic())
        self.meter.begin(self._cpu_base if worker.cgroup is not None and worker.cgroup.counts_cpu else None)
        assert worker.writer is not None
        worker.writer.write(encode([pm.JOB, spec], pm.MAX_PIPE_FRAME))
        metrics.job_phase(job, "agent.run")
        self._watch_memory = watch
        self._poll_timer = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._poll, worker)
        try:
            outcome = await self._pump(worker)
        finally:
            if self._poll_timer is not None:
                self._poll_timer.cancel()
        self._pump_done.set()
        if self.stop_kind is None:
            await self._ended(worker, outcome)
        elif self._stopper is not None:
            await self._stopper  # it sends the terminal once the worker is gone

    def _limit_not_applied(self, worker: WorkerHandle, e: LimitNotApplied) -> None:
        """A layer could not apply a limit: the job does not run, and neither its worker nor
        that cgroup takes another job."""
        log.error("job %s: %s; the worker and its cgroup are retired", self.job.id, e)
        if worker.cgroup is not None:
            worker.cgroup.retired = True
        self.rt.pool.retire(worker)
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
                sock, port = await self.rt.fork_server.listen(worker.pid)
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
        assert self._egress_tasks is not None
        self._egress_tasks.start_soon(self.egress.run, name=f"egress {job.id}")
        return worker.egress.port

    def _egress_event(self, kind: str, body: dict[str, Any]) -> None:
        self._event(Event(kind, body))

    async def _ended(self, worker: WorkerHandle, outcome: Any) -> None:
        job = self.job
        if isinstance(outcome, Done | Fail) and self._cpu_over(worker):
            # The job's tree passed its CPU time between two reads, or since the last one.
            await worker.kill(1.0)
            outcome = _Died()
        if isinstance(outcome, Done):
            self.rt.pool.release(worker, self.rt.reuse_key(job), outcome.left)
            result_id = size = None
            s = self.frames.stream
            if s is not None:
                result_id, size = s.result_id, s.size
            self._finish(SUCCESS, None, value=outcome.value, result_id=result_id, result_size=size)
        elif isinstance(outcome, Fail):
            if outcome.traceback:
                log.warning("job %s: agent raised\n%s", job.id, block(outcome.traceback))  # the worker's text
            self.rt.pool.release(worker, self.rt.reuse_key(job), outcome.left)
            self._finish(ERROR, outcome.error)
        elif isinstance(outcome, WorkerProtocolError | CodecError):
            log.error("job %s: worker %d sent an invalid frame: %s", job.id, worker.pid, one_line(str(outcome), 1024))
            await worker.kill(EXIT_WAIT)
            self._finish(ERROR, InternalError(f"worker sent an invalid frame: {outcome}").to_wire())
        else:  # the pipe closed without an outcome: the worker died
            oom = worker.cgroup is not None and worker.cgroup.memory_exceeded()
            await worker.kill(1.0)
            limits = self.request.limits.as_wire()
            if self._memory_exceeded or oom:
                mib = limits["memory_mb"]
                self._finish(ERROR, InternalError(
                    f"memory limit {mib} MiB exceeded", retryable=False,
                    details={"limit": "memory_mb", "value": mib,
                             "enforced_by": "cgroup" if oom else "watchdog"}).to_wire())
            elif self._cpu_unreadable is not None:
                e = self._cpu_unreadable
                self._finish(ERROR, InternalError(str(e), retryable=True, details=e.details).to_wire())
            elif self._cpu_exceeded or (worker.exited.done() and _killed_by(worker.exited.result(), signal.SIGXCPU)):
                sec = limits["cpu_sec"]
                self._finish(TIMED_OUT, Timeout(
                    f"cpu time limit {sec} s exceeded", retryable=False,
                    details={"limit": "cpu_sec", "value": sec}).to_wire())
            else:
                why = worker.exit_reason()
                self._finish(ERROR, InternalError(
                    f"worker process ended unexpectedly: {why}", retryable=True,
                    details={"exit": why}).to_wire())

    def _poll(self, worker: WorkerHandle) -> None:
        """Every POLL_INTERVAL while the job runs: the memory limit where no memory cgroup holds
        it, the CPU time limit of the whole tree (from its cgroup), and the usage samples."""
        if not worker.alive or self.job.done:
            return
        meter = self.meter
        tree = sample_tree(worker.pid) if self._watch_memory or (meter is not None and meter.needs_tree) else None
        if self._watch_memory and tree is not None and self._memory_over(worker, tree.rss):
            return
        cg = worker.cgroup
        if cg is not None and cg.counts_cpu and self.stop_kind is None and not self._pump_done.is_set() \
                and self._cpu_over(worker):
            worker.signal(signal.SIGKILL)  # the worker's group and every task of its cgroup
            return
        if meter is not None:
            meter.sample(tree)
        self._poll_timer = asyncio.get_running_loop().call_later(POLL_INTERVAL, self._poll, worker)

    def _memory_over(self, worker: WorkerHandle, rss: int) -> bool:
        """The last line for the memory limit: the resident size of the job's process tree."""
        limit = self.request.limits.memory
        if rss <= limit:
            return False
        log.warning("job %s: %d MiB resident, over its %d MiB limit: killing it", self.job.id, rss >> 20,
                    limit >> 20, extra=self._limit_fields("memory_mb", limit >> 20))
        self.limit_logged = True
        self._memory_exceeded = True
        worker.signal(signal.SIGKILL)
        return True

    def _limit_fields(self, key: str, value: Any) -> dict[str, Any]:
        return {"job_id": self.job.id, "limit": key, "value": value}

    def _cpu_over(self, worker: WorkerHandle) -> bool:
        """Has the job's tree used more CPU time than its limit (or can that no longer be told)?"""
        if self._cpu_exceeded or self._cpu_unreadable is not None:
            return True
        cg = worker.cgroup
        if cg is None or not cg.counts_cpu:
            return False
        limit = self.request.limits.cpu_time
        try:
            used = cg.cpu_usage_ns() - self._cpu_base
        except (OSError, ValueError) as e:
            self._cpu_unreadable = self._cpu_limit_error(worker, e)
            cg.retired = True
            log.error("job %s: %s; killing it", self.job.id, self._cpu_unreadable)
            return True
        if used > limit * 1_000_000_000:
            log.warning("job %s: %.2f s of CPU time in its process tree, over its %d s limit: killing it",
                        self.job.id, used / 1e9, limit, extra=self._limit_fields("cpu_sec", limit))
            self.limit_logged = True
            self._cpu_exceeded = True
            return True
        return False

    def _cpu_limit_error(self, worker: WorkerHandle, e: Exception) -> LimitNotApplied:
        assert worker.cgroup is not None
        why = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        return LimitNotApplied("cpu_sec", self.request.limits.cpu_time, worker.cgroup.cpu_layer,
                               f"its CPU time cannot be read: {why}")

    async def _stopping(self, worker: WorkerHandle) -> None:
        """Tell the worker, give it `grace`, then SIGTERM and SIGKILL; then the terminal."""
        try:
            assert worker.writer is not None
            with contextlib.suppress(OSError, RuntimeError, CodecError):
                worker.writer.write(encode([pm.CANCEL, self.stop_kind or "cancel"]))
            # The agent has `grace` to unwind; the worker then reports its end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pump_done.wait(), self.rt.config.grace)
            if worker.alive and not self._pump_done.is_set():
                worker.signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(worker.exited), KILL_SLACK)
            await worker.kill(EXIT_WAIT)  # also closes the pipe, which ends the pump
        finally:
            self._finish(*self._final_or_internal())

    def _final_or_internal(self) -> tuple[str, dict[str, Any]]:
        return self._final or (ERROR, InternalError("job stopped").to_wire())

    # -- frames from the worker -------------------------------------------------
    async def _pump(self, worker: WorkerHandle) -> Any:
        reader, writer = worker.reader, worker.writer
        assert reader is not None and writer is not None
        decoder = FrameDecoder(pm.MAX_PIPE_FRAME)
        frames = self.frames
        outbox = self.owner.outbox
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    decoder.eof()
                    return _Died()
                for f in decoder.feed(data):
                    for action in frames.actions(f):
                        if isinstance(action, Event):
                            self._event(action)
                        elif isinstance(action, Call):
                            self._answer(writer, action)
                            await asyncio.sleep(0)  # a call's work is bounded; others' turn between calls
                        else:
                            return action
                await outbox.wait_writable()
        except (WorkerProtocolError, CodecError) as e:
            return e
        except (ConnectionError, OSError):
            return _Died()

    def _event(self, ev: Event) -> None:
        job = self.job
        if job.done:
            return  # after a stop: discarded
        self.rt.emit_event(job, ev.kind, ev.body)
        if ev.kind == "metric":
            b = ev.body
            for name, value, unit in job.authority.debit_metric(b["name"], b["value"], b.get("unit")):
                self.rt.emit_event(job, "metric", {"name": name, "value": value, "unit": unit})

    # fs.* validate_lease_op calls: answered from a task, one resolution at a time per job.
    _path_lock: asyncio.Lock | None = None
    _path_waiting = 0
    _path_stuck: asyncio.Future[str] | None = None  # a resolution that outlived its timeout

    def _answer(self, writer: asyncio.StreamWriter, call: Call) -> None:
        try:
            check_call(call.op, call.args)  # every argument bounded before any work
            if call.op == "validate_lease_op" and call.args[0] in PATH_CAPABILITIES:
                self._answer_path_check(writer, call)  # resolved off the loop, answered later
                return
            value = self._call(call.op, call.args)
            reply = [pm.REPLY, call.call_id, True, value]
        except ARCPError as e:
            reply = [pm.REPLY, call.call_id, False, e.to_wire()]
        except (TypeError, ValueError) as e:
            reply = [pm.REPLY, call.call_id, False,
                     InvalidRequest(f"bad arguments to {call.op}: {e}").to_wire()]
        self._reply(writer, reply)

    def _reply(self, writer: asyncio.StreamWriter, reply: list[Any]) -> None:
        if self.job.done:
            reply = [pm.REPLY, reply[1], False, Cancelled("job has ended").to_wire()]
        if not writer.is_closing():
            writer.write(encode(reply))

    def _answer_path_check(self, writer: asyncio.StreamWriter, call: Call) -> None:
        if self._path_waiting >= MAX_PATH_CHECKS:
            raise InvalidRequest(f"validate_lease_op: more than {MAX_PATH_CHECKS} path checks of this job "
                                 "are waiting for their answer", retryable=True)
        self._path_waiting += 1
        task = asyncio.get_running_loop().create_task(self._path_check(writer, call))
        _PATH_TASKS.add(task)
        task.add_done_callback(_PATH_TASKS.discard)

    async def _path_check(self, writer: asyncio.StreamWriter, call: Call) -> None:
        cap, target = call.args
        try:
            if self._path_lock is None:
                self._path_lock = asyncio.Lock()
            async with self._path_lock:
                await self._check_path(cap, target)
            reply = [pm.REPLY, call.call_id, True, None]
        except ARCPError as e:
            reply = [pm.REPLY, call.call_id, False, e.to_wire()]
        except Exception as e:  # a supervisor fault: the job hears of it, the loop goes on
            log.exception("job %s: path check failed", self.job.id)
            reply = [pm.REPLY, call.call_id, False,
                     InternalError(f"the path check failed: {type(e).__name__}").to_wire()]
        finally:
            self._path_waiting -= 1
        self._reply(writer, reply)

    async def _check_path(self, cap: str, target: str) -> None:
        """fs.* `validate_lease_op`: the target the job's kernel would open (absolute, cleaned,
        symlinks resolved in the job's view, with its credentials), then the lease. Refusals
        name the target as the job sent it, never what it resolved to."""
        auth = self.job.authority
        if self.job.done:  # queued behind others until after the job's end: nothing to resolve for
            raise Cancelled("job has ended")
        if auth.expired(time.time()):
            raise LeaseExpired("the job's lease has expired")
        if not target.startswith("/"):
            raise PermissionDenied(f"{cap} target {shown(target)} is not an absolute path")
        if not auth.lease.get(cap):  # nothing granted: the same verdict, without resolving anything
            auth.validate_op(cap, target, time.time(), asked=target)
        if self._path_stuck is not None and not self._path_stuck.done():
            raise Timeout(f"{cap} target {shown(target)}: an earlier path check of this job is still "
                          "running", retryable=True)
        worker = self.worker
        uid = worker.uid if worker is not None else None
        try:
            resolved = await path_resolve.resolve(
                clean_path(target), uid=uid, root_pid=worker.pid if worker is not None and uid is not None else None)
        except path_resolve.PathRefused as e:
            raise PermissionDenied(f"{cap} target {shown(target)} cannot be checked: {e}") from None
        except path_resolve.ResolverBusy as e:
            raise Timeout(f"{cap} target {shown(target)}: {e}", retryable=True) from None
        except path_resolve.ResolveTimeout as e:
            self._path_stuck = e.pending
            raise Timeout(f"{cap} target {shown(target)}: {e}", retryable=True) from None
        except OSError as e:
            raise PermissionDenied(f"{cap} target {shown(target)} cannot be checked: "
                                   f"{os.strerror(e.errno) if e.errno else type(e).__name__}") from None
        auth.validate_op(cap, resolved, time.time(), asked=target)

    def _call(self, op: str, args: list[Any]) -> Any:
        job = self.job
        auth = job.authority
        if op == "budget":
            return auth.budget_wire()
        if op == "validate_lease_op":
            cap, target = args  # bounded by check_call; fs.* targets go to _check_path
            if not isinstance(cap, str) or not isinstance(target, str) or cap in PATH_CAPABILITIES:
                raise InvalidRequest("validate_lease_op takes two strings")
            auth.validate_op(cap, target, time.time())
            return None
        if op == "reserve_budget":
            (amounts,) = args
            auth.reserve(amounts, time.time())
            return None
        if op == "tool_call":
            tool, tool_args = args
            if not isinstance(tool, str) or not tool:
                raise InvalidRequest("tool name must be a non-empty string")
            if "tool.call" in self.request.lease and not lease_allows(self.request.lease, "tool.call", tool):
                raise PermissionDenied(f"lease does not grant tool.call on {shown(tool)}")
            call_id = new_id("c")
            self._event(Event("tool_call", {"tool": tool, "args": tool_args, "call_id": call_id}))
            return call_id
        if op == "delegate":
            agent, child_input, lease = args
            return self.rt.delegate(job, agent, child_input, lease)
        if op == "rotate_credential":
            cred_id, value = args
            if not isinstance(cred_id, str) or not isinstance(value, str):
                raise InvalidRequest("rotate_credential takes a credential id and a new value (strings)")
            self.rt.rotate_credential(job, cred_id, value)
            return None
        raise InvalidRequest(f"unknown call {op!r}")

    # -- the end ------------------------------------------------------------------
    def _finish(self, status: str, err: dict[str, Any] | None, *, value: Any = None,
                result_id: str | None = None, result_size: int | None = None) -> None:
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
                        extra=self._limit_fields(str(details.get("limit")), details.get("value")))
        self.rt.finish(self.job, status, err, value=value, result_id=result_id, result_size=result_size,
                       usage=usage)

    def _usage(self, net_in: int, net_out: int) -> dict[str, Any]:
        """What the job has used so far (at its end: all it used)."""
        now = time.monotonic()
        meter = self.meter
        if meter is None:  # it never had a worker
            return usage_wire(now - self.started_at if self.started_at is not None else 0.0,
                              net_bytes_in=net_in, net_bytes_out=net_out)
        if meter.needs_tree and self.worker is not None and self.worker.alive:
            meter.sample(sample_tree(meter.pid))
        return meter.read(now, net_in, net_out)

    def usage_so_far(self) -> dict[str, Any]:
        """For `session.list_jobs`: the figures of a running job until now."""
        e = self.egress
        return self._usage(e.bytes_in, e.bytes_out) if e is not None else self._usage(0, 0)


_PATH_TASKS: set[asyncio.Task[None]] = set()  # path checks in flight (a strong reference each)


def _killed_by(status: int, sig: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == sig
