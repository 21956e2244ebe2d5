"""The state store in SQLite, applied by one thread of its own (see base.py for the contract).

With a state dir the database is `DIR/arcp-supervisor.sqlite3` in WAL mode with
synchronous=NORMAL (the directory 0700, the database and its WAL and
shared-memory files 0600); without one the same code runs on an in-memory
database.

One writer thread owns the only connection; the event loop never touches
SQLite. Every operation, read or write, goes into one FIFO queue. Operations
wake the thread at the end of the event-loop turn that queued them (at once when
no loop runs in the caller's thread), and the thread applies everything queued
by then in ONE transaction (BEGIN IMMEDIATE ... COMMIT), so writes batch up
under load. Results go back to the asyncio loop that asked with
`call_soon_threadsafe`. The thread is a daemon: `await close()` before the
process exits, or what is still queued is lost.

Failures: when a batch's transaction fails at any point, it is rolled back
(with the session byte tallies it changed) and its operations are applied again
one per transaction, so one bad write does not take the others with it. A write
that still fails is logged at ERROR naming the operation and its ids (never a
frame's or record's contents), counted in `failures`, and reported by the
`sync()` calls queued after it in the same batch or, if there are none, by the
next `sync()`. A read that fails raises StoreError to its caller. If even BEGIN
fails during the one-by-one pass (the database is locked past the busy timeout,
or unusable), the rest of the batch fails with that error without further
attempts.

Bound: writes never block the event loop, so the queue is bounded by refusal.
When MAX_QUEUED_OPS operations, or MAX_QUEUED_BYTES bytes of frames, are
waiting, each further write raises StoreError at the call (nothing is queued,
nothing dropped silently), is counted in `failures`, and the store reports
itself unhealthy until the queue drains; an ERROR is logged once per such
episode. Reads and sync() are still accepted (they are awaited, so their callers
are bounded). A producer that can wait should `await sync()` to let the queue
drain.

Each session's frame log is bounded in bytes (`session_log_bytes`): when a run
of frames takes it past the bound, its oldest frames are deleted in the same
transaction, down to TRIM_STEP below the bound, so a trim happens about once per
TRIM_STEP bytes logged. Deleted pages are reused by later frames, and the WAL is
cut back to WAL_LIMIT after checkpoints, so the file holds about the bound per
session plus the job records, whatever the jobs emit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable
from typing import Any

import orjson

from supervisor.state.base import (
    DEFAULT_LOG_BYTES,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_OPS,
    StateStore,
    StoredJob,
    StoreError,
    interrupted_terminal,
)

log = logging.getLogger("arcp.store")
DB_NAME = "arcp-supervisor.sqlite3"
TRIM_STEP = 1024 * 1024  # a trim frees this much below the bound (an eighth of a smaller bound):
# trims stay rare and short (a few thousand rows at most)
WAL_LIMIT = 8 * 1024 * 1024  # the WAL is truncated to this after a checkpoint
FAILURES_LOGGED = 20  # failed operations of one batch logged one by one; the rest in one line
UNREPORTED_KEPT = 1000  # failures waiting for a sync() to report them, kept by name (the rest counted)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    session_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    finished_ns INTEGER,
    trace_id TEXT NOT NULL,
    idempotency_key TEXT,
    fingerprint BLOB,
    record BLOB NOT NULL,      -- accepted payload, lease, constraints, parent (JSON)
    terminal BLOB              -- the terminal outcome (JSON)
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idem ON jobs (principal, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_ns) WHERE finished_ns IS NOT NULL;
CREATE TABLE IF NOT EXISTS frames (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    frame BLOB NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS frames_job ON frames (job_id, seq);
CREATE TABLE IF NOT EXISTS credentials (
    credential_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0
);
"""

# Operation kinds. Writes are queued by the sync methods; the rest are awaited.
_FRAME = "log_frame"
_INSERT = "insert_job"
_FINISH = "finish_job"
_DELETE = "delete_jobs"
_FORGET = "forget_session"
_CREDS = "add_credentials"
_REVOKED = "revocation_attempted"
_WRITES = frozenset((_FRAME, _INSERT, _FINISH, _DELETE, _FORGET, _CREDS, _REVOKED))
_SYNC = "sync"
_STOP = "close"
_RECOVER = "recover"
_TERMINAL = "terminal_of"
_SINCE = "frames_since"
_OLDEST = "oldest_seq"
_JOB_FRAMES = "job_frames"
_UNREVOKED = "unrevoked_credentials"

_Undo = dict[str, int | None]  # session -> its byte tally before this transaction (None: had none)


class _Op:
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


class SqliteStore(StateStore):
    def __init__(self, state_dir: str | None, session_log_bytes: int = DEFAULT_LOG_BYTES, *,
                 max_queued_ops: int = MAX_QUEUED_OPS, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        """Start the writer thread, which opens the database; `await SqliteStore.open(...)` also
        waits for that and raises StoreError if it fails (otherwise the first operations do)."""
        self.path = _private_db(state_dir) if state_dir else ":memory:"
        self.log_bytes = session_log_bytes
        self.max_queued_ops = max_queued_ops
        self.max_queued_bytes = max_queued_bytes
        self.batches = 0  # batches taken from the queue and applied
        self.commits = 0  # transactions committed (one per batch, more when a batch is retried op by op)
        # shared with the writer thread, under _lock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: list[_Op] = []
        self._seq = 0
        self._queued_ops = 0  # queued or being applied
        self._queued_bytes = 0
        self._wake = False
        self._closing = False
        self._finished = False  # the thread has closed the database (or died)
        self._dead: StoreError | None = None  # why the thread stopped without being closed
        self._close_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._refused = 0
        self._refusing = False
        # the event loop's own
        self._wake_loop: asyncio.AbstractEventLoop | None = None
        # the writer thread's own
        self._db: sqlite3.Connection | None = None
        self._log_size: dict[str, int] = {}  # live session -> bytes of its logged frames
        self._failed = 0
        self._last_ok = True
        self._unreported: list[tuple[int, str]] = []  # (seq, what failed) not yet raised by a sync()
        self._unreported_dropped = 0
        self._inflight: list[_Op] = []
        self._thread = threading.Thread(target=self._main, name="arcp-store", daemon=True)
        self._thread.start()

    @classmethod
    async def open(cls, state_dir: str | None, session_log_bytes: int = DEFAULT_LOG_BYTES,
                   **bounds: int) -> SqliteStore:
        store = cls(state_dir, session_log_bytes, **bounds)
        await store.sync()
        return store

    # -- writes -----------------------------------------------------------------
    def log_frame(self, session_id: str, seq: int, job_id: str, data: bytes) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        self._put(_FRAME, (session_id, seq, job_id, data), len(data))

    def insert_job(self, job_id: str, principal: str, session_id: str, agent: str, status: str,
                   created_at: str, trace_id: str, idempotency_key: str | None, fingerprint: bytes | None,
                   record: dict[str, Any]) -> None:
        self._put(_INSERT, (job_id, principal, session_id, agent, status, created_at, time.time_ns(), trace_id,
                            idempotency_key, fingerprint, orjson.dumps(record)))

    def finish_job(self, job_id: str, status: str, terminal: dict[str, Any], record: dict[str, Any]) -> None:
        self._put(_FINISH, (status, orjson.dumps(terminal), orjson.dumps(record), time.time_ns(), job_id))

    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            self._put(_DELETE, (ids,))

    def forget_session(self, session_id: str) -> None:
        self._put(_FORGET, (session_id,))

    def add_credentials(self, job_id: str, credential_ids: list[str]) -> None:
        if credential_ids:
            self._put(_CREDS, (job_id, list(credential_ids)))

    def revocation_attempted(self, credential_id: str, revoked: bool) -> None:
        self._put(_REVOKED, (credential_id, revoked))

    # -- completion and reads -----------------------------------------------------
    async def sync(self) -> None:
        await self._ask(_SYNC, ())

    async def recover(self, retention_jobs: int, retention_seconds: int) -> tuple[list[StoredJob], int]:
        result: tuple[list[StoredJob], int] = await self._ask(_RECOVER, (retention_jobs, retention_seconds))
        return result

    async def terminal_of(self, job_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._ask(_TERMINAL, (job_id,))
        return result

    async def frames_since(self, session_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        result: list[tuple[int, bytes]] = await self._ask(_SINCE, (session_id, after_seq))
        return result

    async def oldest_seq(self, session_id: str) -> int | None:
        result: int | None = await self._ask(_OLDEST, (session_id,))
        return result

    async def job_frames(self, session_id: str, job_id: str, after_seq: int) -> list[bytes]:
        result: list[bytes] = await self._ask(_JOB_FRAMES, (session_id, job_id, after_seq))
        return result

    async def unrevoked_credentials(self, finished_only: bool) -> list[str]:
        result: list[str] = await self._ask(_UNREVOKED, (finished_only,))
        return result

    # -- lifetime and health ------------------------------------------------------
    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._finished:
                return
            self._close_waiters.append((loop, done))
            if not self._closing:
                self._closing = True
                self._seq += 1
                self._queue.append(_Op(_STOP, (), self._seq, 0, None, None))
                self._queued_ops += 1
        self._wake_now()
        await done
        self._thread.join()  # it has nothing left to do but return

    @property
    def failures(self) -> int:
        return self._failed + self._refused

    @property
    def healthy(self) -> bool:
        """False once closed or if the writer thread stopped, while writes are refused for the
        queue's bound, and after a batch with a write that could not be committed (until a later
        batch commits all of its own)."""
        return (self._last_ok and not self._closing and self._dead is None and self._thread.is_alive()
                and not self._over_bound(0))

    @property
    def queued(self) -> tuple[int, int]:
        """Operations queued or being applied, and the bytes of frames among them."""
        return self._queued_ops, self._queued_bytes

    # -- the queue (event loop side) --------------------------------------------------
    def _over_bound(self, nbytes: int) -> bool:
        return self._queued_ops >= self.max_queued_ops or (
            self._queued_ops > 0 and self._queued_bytes + nbytes > self.max_queued_bytes)

    def _put(self, kind: str, args: tuple[Any, ...], nbytes: int = 0,
             loop: asyncio.AbstractEventLoop | None = None, waiter: asyncio.Future[Any] | None = None) -> None:
        refused: StoreError | None = None
        log_refusal = log_recovery = False
        with self._lock:
            if self._dead is not None:
                raise StoreError(f"{_describe(kind, args)} refused: {self._dead}")
            if self._closing:
                raise StoreError(f"{_describe(kind, args)} refused: the state store is closed")
            write = kind in _WRITES
            if write and self._over_bound(nbytes):
                self._refused += 1
                log_refusal, self._refusing = not self._refusing, True
                waiting = (self._queued_ops, self._queued_bytes)
                refused = StoreError(f"{_describe(kind, args)} refused: the state store's queue is full "
                                     f"({waiting[0]} operations, {waiting[1]} bytes of frames waiting)")
            else:
                if write and self._refusing:
                    log_recovery, self._refusing = True, False
                self._seq += 1
                self._queue.append(_Op(kind, args, self._seq, nbytes, loop, waiter))
                self._queued_ops += 1
                self._queued_bytes += nbytes
        if refused is not None:
            if log_refusal:
                log.error("state store: %d operations and %d bytes of frames are waiting to be written; "
                          "refusing writes until they drain", *waiting)
            raise refused
        if log_recovery:
            log.warning("state store: accepting writes again (%d refused so far)", self._refused)
        self._kick()

    async def _ask(self, kind: str, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._put(kind, args, 0, loop, waiter)
        return await waiter

    def _kick(self) -> None:
        """Wake the writer at the end of this loop turn, so the turn's writes make one batch."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._wake_now()
            return
        if self._wake_loop is not loop:
            self._wake_loop = loop
            loop.call_soon(self._wake_now)

    def _wake_now(self) -> None:
        self._wake_loop = None
        with self._cond:
            self._wake = True
            self._cond.notify()

    # -- the writer thread ----------------------------------------------------------
    def _main(self) -> None:
        try:
            self._db = self._connect()
        except Exception as e:
            log.error("state store: cannot open %s: %s", self.path, e)
            self._die(StoreError(f"cannot open the state database {self.path}: {e}"))
            return
        try:
            while True:
                batch = self._take()
                stop = bool(batch) and batch[-1].kind == _STOP
                work = batch[:-1] if stop else batch
                if work:
                    self._run_batch(work)
                with self._lock:  # before the results: a caller they wake sees the queue without them
                    self._queued_ops -= len(batch)
                    self._queued_bytes -= sum(op.nbytes for op in batch)
                self._deliver(work)
                with self._lock:
                    self._inflight = []
                if stop:
                    break
        except BaseException as e:
            log.exception("state store: the writer thread failed")
            self._die(StoreError(f"the state store's writer thread failed: {e!r}"))
            return
        self._close_db()
        self._finish()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None)  # only this thread may use it
        try:
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            db.executescript(SCHEMA)
            if self.path != ":memory:":
                _tighten(self.path)
        except BaseException:
            db.close()
            raise
        return db

    def _take(self) -> list[_Op]:
        with self._cond:
            waited: _Op | None = None
            while not self._wake:
                if not self._cond.wait(timeout=1.0) and self._queue:
                    if self._queue[0] is waited:
                        break  # queued a second ago or more on a loop that stopped before waking us
                    waited = self._queue[0]
            self._wake = False
            batch, self._queue = self._queue, []
            self._inflight = batch
        return batch

    def _run_batch(self, batch: list[_Op]) -> None:
        """Apply a batch in one transaction; on failure, roll it back and apply it op by op."""
        self.batches += 1
        work = [op for op in batch if op.kind != _SYNC]
        if work:
            undo: _Undo = {}
            try:
                self._begin()
                self._apply_all(work, undo)
                self._commit()
            except Exception as e:
                self._rollback(undo)
                for op in work:
                    op.result = None
                log.warning("state store: a batch of %d operations failed (%s: %s); applying them one at a time",
                            len(work), type(e).__name__, e)
                self._apply_one_by_one(work)
        failed = [op for op in work if op.error is not None]
        if any(op.kind in _WRITES for op in work):
            self._last_ok = not any(op.kind in _WRITES for op in failed)
        for n, op in enumerate(failed):
            if op.kind in _WRITES:
                self._failed += 1
                if len(self._unreported) < UNREPORTED_KEPT:
                    self._unreported.append((op.seq, str(op.error)))
                else:
                    self._unreported_dropped += 1
            if n < FAILURES_LOGGED:
                log.error("state store: %s", op.error)
        if len(failed) > FAILURES_LOGGED:
            log.error("state store: and %d more operations of the same batch failed", len(failed) - FAILURES_LOGGED)
        last_sync = 0
        for op in batch:
            if op.kind == _SYNC:
                op.error = self._sync_error(op.seq)
                last_sync = op.seq
        if last_sync:
            self._unreported = [u for u in self._unreported if u[0] > last_sync]
            self._unreported_dropped = 0

    def _sync_error(self, seq: int) -> StoreError | None:
        failed = [what for s, what in self._unreported if s < seq]
        n = len(failed) + self._unreported_dropped
        if not n:
            return None
        shown = "; ".join(failed[:5]) + (f"; and {n - min(5, len(failed))} more" if n > 5 else "")
        return StoreError(f"{n} write{'s' if n > 1 else ''} could not be committed: {shown}", failed)

    def _apply_all(self, ops: list[_Op], undo: _Undo) -> None:
        i = 0
        while i < len(ops):
            if ops[i].kind == _FRAME:  # a run of frames: one statement, then the trims
                j = i
                while j < len(ops) and ops[j].kind == _FRAME:
                    j += 1
                self._log_frames([op.args for op in ops[i:j]], undo)
                i = j
            else:
                ops[i].result = self._apply(ops[i], undo)
                i += 1

    def _apply_one_by_one(self, ops: list[_Op]) -> None:
        broken: str | None = None  # BEGIN itself failed: the rest is not tried
        for op in ops:
            if broken is not None:
                op.error = StoreError(f"{_describe(op.kind, op.args)}: not attempted: {broken}")
                continue
            undo: _Undo = {}
            try:
                self._begin()
            except Exception as e:
                broken = f"{type(e).__name__}: {e}"
                op.error = StoreError(f"{_describe(op.kind, op.args)}: {broken}")
                self._rollback(undo)
                continue
            try:
                if op.kind == _FRAME:
                    self._log_frames([op.args], undo)
                else:
                    op.result = self._apply(op, undo)
                self._commit()
            except Exception as e:
                self._rollback(undo)
                op.result = None
                op.error = StoreError(f"{_describe(op.kind, op.args)}: {type(e).__name__}: {e}")

    def _begin(self) -> None:
        assert self._db is not None
        self._db.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        assert self._db is not None
        self._db.execute("COMMIT")
        self.commits += 1

    def _rollback(self, undo: _Undo) -> None:
        assert self._db is not None
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except Exception:
            log.exception("state store: ROLLBACK failed")
        for session_id, size in undo.items():
            if size is None:
                self._log_size.pop(session_id, None)
            else:
                self._log_size[session_id] = size

    def _deliver(self, batch: list[_Op]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, StoreError | None]]] = {}
        for op in batch:
            if op.waiter is not None and op.loop is not None:
                by_loop.setdefault(op.loop, []).append((op.waiter, op.result, op.error))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def _die(self, err: StoreError) -> None:
        """The thread cannot go on: fail whatever is queued or in flight, refuse everything after."""
        with self._lock:
            self._dead = err
            ops, self._queue = self._inflight + self._queue, []
            self._inflight = []
            self._queued_ops = self._queued_bytes = 0
        self._last_ok = False
        for op in ops:
            if op.kind in _WRITES:
                self._failed += 1
            op.result, op.error = None, StoreError(f"{_describe(op.kind, op.args)}: {err}")
        self._deliver(ops)
        self._close_db()
        self._finish()

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except Exception:
                log.exception("state store: closing the database failed")
            self._db = None

    def _finish(self) -> None:
        with self._lock:
            self._finished = True
            waiters, self._close_waiters = self._close_waiters, []
        for loop, done in waiters:
            settled: list[tuple[asyncio.Future[Any], Any, StoreError | None]] = [(done, None, None)]
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:
                pass

    # -- the operations (writer thread, inside a transaction) ---------------------------
    def _apply(self, op: _Op, undo: _Undo) -> Any:
        db = self._db
        assert db is not None
        k, a = op.kind, op.args
        if k == _INSERT:
            db.execute("INSERT INTO jobs (job_id, principal, session_id, agent, status, created_at, created_ns,"
                       " trace_id, idempotency_key, fingerprint, record) VALUES (?,?,?,?,?,?,?,?,?,?,?)", a)
        elif k == _FINISH:
            db.execute("UPDATE jobs SET status = ?, terminal = ?, record = ?, finished_ns = ? WHERE job_id = ?", a)
        elif k == _DELETE:
            self._delete_jobs(a[0], undo)
        elif k == _FORGET:
            session_id = a[0]
            self._set_size(session_id, None, undo)
            db.execute("DELETE FROM frames WHERE session_id = ? AND job_id NOT IN "
                       "(SELECT job_id FROM jobs WHERE session_id = ?)", (session_id, session_id))
        elif k == _CREDS:
            job_id, credential_ids = a
            db.executemany("INSERT OR IGNORE INTO credentials (credential_id, job_id) VALUES (?, ?)",
                           [(c, job_id) for c in credential_ids])
        elif k == _REVOKED:
            credential_id, revoked = a
            if revoked:
                db.execute("DELETE FROM credentials WHERE credential_id = ?", (credential_id,))
            else:
                db.execute("UPDATE credentials SET attempts = attempts + 1 WHERE credential_id = ?",
                           (credential_id,))
        elif k == _RECOVER:
            return self._recover(a[0], a[1], undo)
        elif k == _TERMINAL:
            row = db.execute("SELECT terminal FROM jobs WHERE job_id = ?", a).fetchone()
            return orjson.loads(row[0]) if row and row[0] is not None else None
        elif k == _SINCE:
            return db.execute("SELECT seq, frame FROM frames WHERE session_id = ? AND seq > ? ORDER BY seq",
                              a).fetchall()
        elif k == _OLDEST:
            row = db.execute("SELECT MIN(seq) FROM frames WHERE session_id = ?", a).fetchone()
            return row[0] if row else None
        elif k == _JOB_FRAMES:
            session_id, job_id, after_seq = a
            return [r[0] for r in db.execute(
                "SELECT frame FROM frames WHERE job_id = ? AND session_id = ? AND seq > ? ORDER BY seq",
                (job_id, session_id, after_seq))]
        elif k == _UNREVOKED:
            query = "SELECT c.credential_id FROM credentials c"
            if a[0]:
                query += " JOIN jobs j ON j.job_id = c.job_id WHERE j.finished_ns IS NOT NULL"
            return [r[0] for r in db.execute(query)]
        else:
            raise AssertionError(f"unknown operation {k!r}")
        return None

    def _set_size(self, session_id: str, size: int | None, undo: _Undo) -> None:
        if session_id not in undo:
            undo[session_id] = self._log_size.get(session_id)
        if size is None:
            self._log_size.pop(session_id, None)
        else:
            self._log_size[session_id] = size

    def _log_frames(self, rows: list[tuple[Any, ...]], undo: _Undo) -> None:
        assert self._db is not None
        grown: dict[str, tuple[int, int]] = {}  # session -> (bytes added, newest seq)
        for session_id, seq, _, data in rows:
            added, newest = grown.get(session_id, (0, 0))
            grown[session_id] = (added + len(data), max(newest, seq))
        self._db.executemany("INSERT OR REPLACE INTO frames (session_id, seq, job_id, frame) VALUES (?,?,?,?)", rows)
        for session_id, (added, newest) in grown.items():
            size = self._log_size.get(session_id, 0) + added
            if size > self.log_bytes:
                size = self._trim(session_id, size, newest)
            self._set_size(session_id, size, undo)

    def _trim(self, session_id: str, size: int, newest: int) -> int:
        """Delete a session's oldest frames until its log is below the trim target (never its
        newest frame, which fits the bound alone); return the bytes left."""
        assert self._db is not None
        target = self.log_bytes - min(self.log_bytes // 8, TRIM_STEP)
        cut = None
        cur = self._db.execute("SELECT seq, length(frame) FROM frames WHERE session_id = ? AND seq < ? ORDER BY seq",
                               (session_id, newest))
        try:
            for seq, n in cur:
                if size <= target:
                    break
                size -= n
                cut = seq
        finally:
            cur.close()
        if cut is not None:
            self._db.execute("DELETE FROM frames WHERE session_id = ? AND seq <= ?", (session_id, cut))
        return size

    def _delete_jobs(self, job_ids: list[str], undo: _Undo) -> None:
        db = self._db
        assert db is not None
        ids = [(j,) for j in job_ids]
        if not ids:
            return
        for (job_id,) in ids:
            for session_id, n in db.execute(
                    "SELECT session_id, SUM(length(frame)) FROM frames WHERE job_id = ? GROUP BY session_id",
                    (job_id,)).fetchall():
                if session_id in self._log_size:
                    self._set_size(session_id, max(0, self._log_size[session_id] - (n or 0)), undo)
        db.executemany("DELETE FROM frames WHERE job_id = ?", ids)
        db.executemany("DELETE FROM jobs WHERE job_id = ?", ids)

    def _recover(self, retention_jobs: int, retention_seconds: int, undo: _Undo) -> tuple[list[StoredJob], int]:
        db = self._db
        assert db is not None
        now = time.time_ns()
        interrupted = db.execute("SELECT job_id FROM jobs WHERE finished_ns IS NULL").fetchall()
        if interrupted:
            term = orjson.dumps(interrupted_terminal(now))
            db.executemany("UPDATE jobs SET status = 'error', terminal = ?, finished_ns = ? WHERE job_id = ?",
                           [(term, now, job_id) for (job_id,) in interrupted])
        old = db.execute("SELECT job_id FROM jobs WHERE finished_ns < ?",
                         (now - retention_seconds * 1_000_000_000,)).fetchall()
        self._delete_jobs([j for (j,) in old], undo)
        excess = db.execute("SELECT job_id FROM jobs ORDER BY finished_ns DESC LIMIT -1 OFFSET ?",
                            (retention_jobs,)).fetchall()
        self._delete_jobs([j for (j,) in excess], undo)
        rows = db.execute(
            "SELECT job_id, principal, session_id, agent, status, created_at, trace_id, idempotency_key,"
            " fingerprint, record, terminal FROM jobs ORDER BY created_ns").fetchall()
        jobs = [StoredJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], orjson.loads(r[9]),
                          orjson.loads(r[10]) if r[10] is not None else None) for r in rows]
        return jobs, len(interrupted)


def _settle(settled: list[tuple[asyncio.Future[Any], Any, StoreError | None]]) -> None:
    """On the event loop: hand results and errors to whoever still waits for them."""
    for fut, result, error in settled:
        if fut.done():  # the caller was cancelled
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


def _describe(kind: str, a: tuple[Any, ...]) -> str:
    """An operation and its ids, for logs and errors (never a frame's or a record's contents)."""
    if kind == _FRAME:
        return f"log_frame session={_s(a[0])} seq={a[1]} job={_s(a[2])} ({len(a[3])} bytes)"
    if kind == _INSERT:
        return f"insert_job job={_s(a[0])} session={_s(a[2])}"
    if kind == _FINISH:
        return f"finish_job job={_s(a[4])} status={_s(a[0])}"
    if kind == _DELETE:
        return f"delete_jobs jobs={_ids(a[0])}"
    if kind == _FORGET:
        return f"forget_session session={_s(a[0])}"
    if kind == _CREDS:
        return f"add_credentials job={_s(a[0])} credentials={_ids(a[1])}"
    if kind == _REVOKED:
        return f"revocation_attempted credential={_s(a[0])} revoked={a[1]}"
    if kind == _RECOVER:
        return f"recover retention_jobs={a[0]} retention_seconds={a[1]}"
    if kind in (_TERMINAL, _OLDEST):
        return f"{kind} {'job' if kind == _TERMINAL else 'session'}={_s(a[0])}"
    if kind == _SINCE:
        return f"frames_since session={_s(a[0])} after={a[1]}"
    if kind == _JOB_FRAMES:
        return f"job_frames session={_s(a[0])} job={_s(a[1])} after={a[2]}"
    if kind == _UNREVOKED:
        return f"unrevoked_credentials finished_only={a[0]}"
    return kind


def _s(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:80] + "..."


def _ids(ids: list[str]) -> str:
    shown = ",".join(_s(i) for i in ids[:5])
    return f"[{shown}{f',... ({len(ids)} in all)' if len(ids) > 5 else ''}]"


def _private_db(state_dir: str) -> str:
    """The database path in a directory only the supervisor's user can enter; the file 0600."""
    try:
        os.makedirs(state_dir, mode=0o700)
    except FileExistsError:
        if not os.path.isdir(state_dir):
            raise
        mode = os.stat(state_dir).st_mode & 0o777
        if mode & 0o077:
            log.warning("state dir %s is mode %03o: others can see what it holds (the database itself "
                        "is 0600)", state_dir, mode)
    else:
        os.chmod(state_dir, 0o700)  # makedirs' mode is masked by the umask
    path = os.path.join(state_dir, DB_NAME)
    # SQLite makes its WAL and shared-memory files with the database file's mode: create it 0600 first.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    _tighten(path)
    return path


def _tighten(path: str) -> None:
    """WAL and shared-memory files left by an older run with a wider mode: 0600 too."""
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            st = os.stat(path + suffix, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            os.chmod(path + suffix, 0o600)
