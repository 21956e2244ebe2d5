"""The operations every queued store (supervisor/state/queued.py) puts in its writer's queue,
whatever the database: their kinds, the queue entry (`Op`) and how each is named in logs and
errors (ids only, never a frame's or a record's contents)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from supervisor.state.base import StoredJob, StoreError

# Operation kinds. Writes are queued by the sync methods; the rest are awaited.
FRAME = "log_frame"
INSERT = "insert_job"
FINISH = "finish_job"
DELETE = "delete_jobs"
FORGET = "forget_session"
CREDS = "add_credentials"
REVOKED = "revocation_attempted"
# several nodes on one database (PostgreSQL: supervisor/state/postgres_cluster.py)
SESSION_PUT = "session_put"
SESSION_DROP = "session_drop"
RELAY = "relay"
COMMAND = "command"
RUNNING = "job_running"
FOLLOW = "follow"
WRITES = frozenset((FRAME, INSERT, FINISH, DELETE, FORGET, CREDS, REVOKED, SESSION_PUT, SESSION_DROP, RELAY, COMMAND,
                    RUNNING, FOLLOW))
SYNC = "sync"
STOP = "close"
CLAIM = "claim_job"  # an awaited write: its failure goes to its caller (like a read's)
RECOVER = "recover"
TERMINAL = "terminal_of"
SINCE = "frames_since"
OLDEST = "oldest_seq"
JOB_FRAMES = "job_frames"
UNREVOKED = "unrevoked_credentials"
SESSION_GET = "session_get"
SESSION_TAKE = "session_take"
RELAY_TAKE = "relay_take"
JOB_GET = "job_get"
JOBS_OF = "jobs_of"
NODE_GONE = "node_gone"
COMMANDS_TAKE = "commands_take"
CLUSTER_KINDS = frozenset((NODE_GONE, COMMANDS_TAKE, FOLLOW, SESSION_PUT, SESSION_DROP, RELAY, COMMAND, RUNNING, SESSION_GET, SESSION_TAKE, RELAY_TAKE, JOB_GET,
                           JOBS_OF))

Undo = dict[str, int | None]  # session -> its byte tally before this transaction (None: had none)


class Op:
    """One operation in the writer thread's queue, and what became of it."""

    __slots__ = ("kind", "args", "seq", "nbytes", "loop", "waiter", "result", "error")

    def __init__(self, kind: str, args: tuple[Any, ...], seq: int, nbytes: int,
                 loop: asyncio.AbstractEventLoop | None, waiter: asyncio.Future[Any] | None) -> None:
        self.kind = kind
        self.args = args
        self.seq = seq  # place in the queue's order
        self.nbytes = nbytes  # frame bytes it holds (for the queue's bound)
        self.loop = loop
        self.waiter = waiter
        self.result: Any = None
        self.error: StoreError | None = None


class BatchApplier:
    """What both databases' backends share: a batch's operations applied in order, each run
    of frames as one statement (`log_frames`), every other operation by `apply`."""

    log_size: dict[str, int]  # session -> bytes of its logged frames, as committed

    def log_frames(self, rows: list[tuple[Any, ...]], undo: Undo) -> None:
        raise NotImplementedError

    def apply(self, op: Op, undo: Undo) -> Any:
        raise NotImplementedError

    def apply_all(self, ops: list[Op], undo: Undo) -> None:
        i = 0
        while i < len(ops):
            if ops[i].kind == FRAME:  # a run of frames: one statement, then the trims
                j = i
                while j < len(ops) and ops[j].kind == FRAME:
                    j += 1
                self.log_frames([op.args for op in ops[i:j]], undo)
                i = j
            else:
                ops[i].result = self.apply(ops[i], undo)
                i += 1

    def apply_one(self, op: Op, undo: Undo) -> None:
        """One operation in a transaction of its own (the batch failed: each on its own)."""
        if op.kind == FRAME:
            self.log_frames([op.args], undo)
        else:
            op.result = self.apply(op, undo)

    def restore_sizes(self, undo: Undo) -> None:
        """The sessions' byte tallies as they were before a transaction that was rolled back."""
        for session_id, size in undo.items():
            if size is None:
                self.log_size.pop(session_id, None)
            else:
                self.log_size[session_id] = size


def describe(kind: str, a: tuple[Any, ...]) -> str:
    """An operation and its ids, for logs and errors (never a frame's or a record's contents)."""
    if kind == FRAME:
        return f"log_frame session={_s(a[0])} seq={a[1]} job={_s(a[2])} ({len(a[3])} bytes)"
    if kind in (INSERT, CLAIM):
        return f"{kind} job={_s(a[0])} session={_s(a[2])}"
    if kind == FINISH:
        return f"finish_job job={_s(a[4])} status={_s(a[0])}"
    if kind == DELETE:
        return f"delete_jobs jobs={_ids(a[0])}"
    if kind == FORGET:
        return f"forget_session session={_s(a[0])}"
    if kind == CREDS:
        return f"add_credentials job={_s(a[0])} credentials={_ids(a[1])}"
    if kind == REVOKED:
        return f"revocation_attempted credential={_s(a[0])} revoked={a[1]}"
    if kind == RECOVER:
        return f"recover retention_jobs={a[0]} retention_seconds={a[1]}"
    if kind in (TERMINAL, OLDEST):
        return f"{kind} {'job' if kind == TERMINAL else 'session'}={_s(a[0])}"
    if kind == SINCE:
        return f"frames_since session={_s(a[0])} after={a[1]}"
    if kind == JOB_FRAMES:
        return f"job_frames session={_s(a[0])} job={_s(a[1])} after={a[2]}"
    if kind == UNREVOKED:
        return f"unrevoked_credentials finished_only={a[0]} finished_before_ns={a[1]}"
    if kind == FOLLOW:
        return f"follow job={_s(a[0])} session={_s(a[1])} follows={a[2]}"
    if kind in (SESSION_PUT, SESSION_DROP, SESSION_GET, RELAY_TAKE):
        return f"{kind} session={_s(a[0])}"
    if kind in (NODE_GONE, COMMANDS_TAKE, COMMAND):
        return f"{kind} node={_s(a[0])}"
    if kind == SESSION_TAKE:
        return f"{kind} session={_s(a[0])} from={_s(a[1])}"
    if kind == RELAY:
        return f"relay session={_s(a[0])} job={_s(a[1])} kind={a[2]} ({len(a[3])} bytes)"
    if kind in (JOB_GET, RUNNING):
        return f"{kind} job={_s(a[0])}"
    if kind == JOBS_OF:
        return f"jobs_of principal={_s(a[0])}"
    return kind


def _s(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:80] + "..."


def _ids(ids: list[str]) -> str:
    shown = ",".join(_s(i) for i in ids[:5])
    return f"[{shown}{f',... ({len(ids)} in all)' if len(ids) > 5 else ''}]"


JOB_COLUMNS = ("job_id, principal, session_id, agent, status, created_at, trace_id, idempotency_key,"
               " fingerprint, record, terminal")


def stored_job(r: Any) -> StoredJob:
    """A row of JOB_COLUMNS (record and terminal as JSON bytes)."""
    return StoredJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7],
                     bytes(r[8]) if r[8] is not None else None, orjson.loads(r[9]),
                     orjson.loads(r[10]) if r[10] is not None else None)
