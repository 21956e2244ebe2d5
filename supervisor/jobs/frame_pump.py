"""Frames from a job's worker: its events relayed, its calls answered, its outcome returned.

The pump reads the worker's pipe while the job runs: an event goes to the job's sessions
(a metric also debits the job's budget), a call is answered over the pipe (calls.py, with
the runner as its `CallHost`), and the first outcome ends the pump: `Done`, `Fail`, an
invalid frame (`WorkerProtocolError`, `CodecError`), or `Died` (the pipe closed without
one). The next frame is read only while the submitter's and every follower's outbox are
below their high-water marks.

A call whose answer waits (calls.Later) is answered from a task of the job's task group
(`group`, the runner's, while the pump runs), in a cancel scope of its own: cancelled, with
its answer, when the pump ends (`cancel_waiting`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from shared import pipe_messages as pm
from shared.errors import ARCPError, Cancelled, InternalError, InvalidRequest
from shared.pipe_codec import CodecError, FrameDecoder, encode
from supervisor.jobs import calls
from supervisor.jobs.worker_rpc import Call, Event, WorkerFrames, WorkerProtocolError

if TYPE_CHECKING:
    from supervisor.core.jobs import Job
    from supervisor.jobs.host import RunnerHost
    from supervisor.jobs.worker_handle import WorkerHandle
    from supervisor.core.session import Session

log = logging.getLogger("arcp.jobs")
MAX_WAITING = 256  # calls of one kind (calls.Later.name) of one job waiting for their answer
FOLLOWER_GRACE = 2.0  # seconds a follower at its high-water mark may hold a job before it is dropped


class Died:
    """The pipe closed without an outcome: the worker died."""


class FramePump:
    def __init__(self, rt: RunnerHost, job: Job, owner: Session, frames: WorkerFrames,
                 host: calls.CallHost) -> None:
        self.rt = rt
        self.job = job
        self.owner = owner
        self.frames = frames
        self.host = host
        self.group: TaskGroup | None = None  # the job's, while the pump runs: calls answered later
        self._waiting: dict[str, int] = {}  # calls answered later, by kind, waiting for their answer
        self._scopes: set[anyio.CancelScope] = set()  # theirs, until each is answered

    async def run(self, worker: WorkerHandle) -> Any:
        reader, writer = worker.reader, worker.writer
        assert reader is not None and writer is not None
        decoder = FrameDecoder(pm.MAX_PIPE_FRAME)
        frames = self.frames
        outbox = self.owner.outbox
        store = self.rt.store  # the frames' log: a writer far behind holds the job too
        try:
            while True:
                data = await reader.read(1 << 18)
                if not data:
                    decoder.eof()
                    return Died()
                for f in decoder.feed(data):
                    for action in frames.actions(f):
                        if isinstance(action, Event):
                            self.event(action)
                        elif isinstance(action, Call):
                            self.answer(writer, action)
                            await anyio.lowlevel.checkpoint()  # a call's work is bounded; others' turn between calls
                        else:
                            return action
                    # Past a session's high-water mark (the submitter's, or a follower's): no next
                    # frame until it is below. A follower holds the job for FOLLOWER_GRACE at
                    # most: then it is taken as not reading and dropped, and the job goes on.
                    await outbox.wait_writable()
                    for w in self.job.watchers:
                        if not w.session.outbox.writable:
                            with anyio.move_on_after(FOLLOWER_GRACE) as waited:
                                await w.session.outbox.wait_writable()
                            if waited.cancelled_caught:
                                w.session.drop_stalled()
                    await store.writable()
        except (WorkerProtocolError, CodecError) as e:
            return e
        except (ConnectionError, OSError):
            return Died()

    def event(self, ev: Event) -> None:
        job = self.job
        if job.done:
            return  # after a stop: discarded
        self.rt.emit_event(job, ev.kind, ev.body)
        if ev.kind == "metric":
            b = ev.body
            for name, value, unit in job.authority.debit_metric(b["name"], b["value"], b.get("unit")):
                self.rt.emit_event(job, "metric", {"name": name, "value": value, "unit": unit})

    # -- calls (calls.py) -------------------------------------------------------
    def answer(self, writer: asyncio.StreamWriter, call: Call) -> None:
        try:
            value = calls.answer(self.host, call.op, call.args)  # every argument bounded before any work
            if isinstance(value, calls.Later):
                self._answer_later(writer, call, value)
                return
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

    def _answer_later(self, writer: asyncio.StreamWriter, call: Call, later: calls.Later) -> None:
        """A call whose answer waits: answered from a task of the job's group, in a cancel scope
        of its own (cancelled, with its answer, when the pump ends); at most MAX_WAITING of a
        kind wait at once."""
        assert self.group is not None  # calls come from the pump
        waiting = self._waiting.get(later.name, 0)
        if waiting >= MAX_WAITING:
            raise InvalidRequest(f"{call.op}: more than {MAX_WAITING} {later.name}s of this job "
                                 "are waiting for their answer", retryable=True)
        self._waiting[later.name] = waiting + 1
        scope = anyio.CancelScope()
        self._scopes.add(scope)
        self.group.start_soon(self._answered_later, writer, call, later, scope)

    def cancel_waiting(self) -> None:
        """The pump has ended: calls still waiting are cancelled, and never answered."""
        scopes, self._scopes = self._scopes, set()
        for scope in scopes:
            scope.cancel()

    async def _answered_later(self, writer: asyncio.StreamWriter, call: Call, later: calls.Later,
                              scope: anyio.CancelScope) -> None:
        try:
            with scope:
                try:
                    reply = [pm.REPLY, call.call_id, True, await later.answer()]
                except ARCPError as e:
                    reply = [pm.REPLY, call.call_id, False, e.to_wire()]
                except Exception as e:  # a supervisor fault: the job hears of it, the loop goes on
                    log.exception("job %s: %s failed", self.job.id, later.name)
                    reply = [pm.REPLY, call.call_id, False,
                             InternalError(f"the {later.name} failed: {type(e).__name__}").to_wire()]
                self._reply(writer, reply)  # (not reached once cancelled)
        finally:
            self._waiting[later.name] -= 1
            self._scopes.discard(scope)
