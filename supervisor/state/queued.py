"""The engine of a state store whose database is used by one writer thread of its own (see
base.py for the contract): SqliteStore (sqlite.py) and PostgresStore (postgres.py) are this
engine with a database behind it (a `Backend`).

One writer thread owns the only connection; the event loop never touches the
database. Every operation, read or write, goes into one FIFO queue. An operation
someone awaits (a read, a claim, a sync) wakes the thread at the end of the
event-loop turn that queued it, as does a queue of GROUP_OPS operations or
GROUP_BYTES of frames; other writes wake it within GROUP_DELAY (2 ms), so that
the writes of a job's acceptance, events and end make one batch instead of
waking the thread once per turn (at once when no loop runs in the caller's
thread). The thread hands everything queued by then (at most BATCH_BYTES of
frames) to the backend, which applies it in ONE transaction, so writes batch up
under load. Results go back to the asyncio loop
that asked with `call_soon_threadsafe`. The thread is a daemon: `await close()`
before the process exits, or what is still queued is lost.

Failures: when a batch's transaction fails at any point, the backend rolls it
back (with the session byte tallies it changed) and applies its operations again
one per transaction, so one bad write does not take the others with it. A write
that still fails is logged at ERROR naming the operation and its ids (never a
frame's or record's contents), counted in `failures`, and reported by the
`sync()` calls queued after it in the same batch or, if there are none, by the
next `sync()`. A read (or claim_job) that fails raises StoreError to its caller.
A backend that loses its connection (PostgreSQL) keeps the batch and reconnects
before going on; meanwhile the store is unhealthy and operations wait in the
queue, which the bound below keeps finite.

Bound: writes never block the event loop, so the queue is bounded by refusal.
When max_queued_ops operations, or max_queued_bytes bytes of frames, are
waiting, each further write raises StoreError at the call (nothing is queued,
nothing dropped silently), is counted in `failures`, and the store reports
itself unhealthy until the queue drains; an ERROR is logged once per such
episode. Reads and sync() are still accepted (they are awaited, so their callers
are bounded). A producer that can wait should `await writable()` or `sync()`.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import orjson

from supervisor.state.base import (
    DEFAULT_LOG_BYTES, HIGH_WATER_BYTES, LOW_WATER_BYTES, MAX_QUEUED_BYTES, MAX_QUEUED_OPS, StateStore, StoredJob, StoreError,
)
from supervisor.state.ops import (
    CLAIM, CREDS, DELETE, FINISH, FORGET, FRAME, INSERT, JOB_FRAMES, OLDEST, RECOVER, REVOKED, SINCE, STOP, SYNC,
    TERMINAL, UNREVOKED, WRITES, Op, describe,
)

log = logging.getLogger("arcp.store")
FAILURES_LOGGED = 20  # failed operations of one batch logged one by one; the rest in one line
UNREPORTED_KEPT = 1000  # failures waiting for a sync() to report them, kept by name (the rest counted)
BATCH_BYTES = 4 * 1024 * 1024  # bytes of frames one transaction takes at most: the WAL stays small
GROUP_DELAY = 0.002  # seconds a write nobody awaits may wait for others to join its batch
GROUP_OPS, GROUP_BYTES = 256, 256 * 1024  # a queue this long is handed over at the end of the turn


class Backend(Protocol):
    """A database as the writer thread uses it; made, used and closed on that thread only."""

    def apply_batch(self, ops: list[Op]) -> int:
        """Apply `ops` (no SYNC or STOP among them) in one transaction, or one per transaction
        if that fails, each op's result or error in it; return the transactions committed."""

    def idle(self) -> None:
        """The queue has been empty for a while (called about once a second)."""

    def close(self) -> None:
        """Close the connection."""


class QueuedStore(StateStore):
    def __init__(self, where: str, session_log_bytes: int = DEFAULT_LOG_BYTES, *,
                 max_queued_ops: int = MAX_QUEUED_OPS, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        """Start the writer thread, which opens the database (`_connect`); a subclass sets what
        that needs before calling this. `where` names the database in logs and errors."""
        self.where = where
        self.log_bytes = session_log_bytes
        self.max_queued_ops = max_queued_ops
        self.max_queued_bytes = max_queued_bytes
        self.batches = 0  # batches taken from the queue and applied
        self.commits = 0  # transactions committed (one per batch, more when a batch is retried op by op)
        # shared with the writer thread, under _lock
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: list[Op] = []
        self._seq = 0
        self._queued_ops = 0  # queued or being applied
        self._queued_bytes = 0
        self._wake = False
        self._closing = False
        self._close_started: float | None = None
        self._close_called = threading.Event()
        self._finished = False  # the thread has closed the database (or died)
        self._dead: StoreError | None = None  # why the thread stopped without being closed
        self._close_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._refused = 0
        self._refusing = False
        self._room: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None  # writable()'s waiters
        # the event loop's own
        self._wake_loop: asyncio.AbstractEventLoop | None = None  # a wake is due at the end of its turn
        self._wake_timer: asyncio.TimerHandle | None = None  # a grouped wake is due (GROUP_DELAY)
        # the writer thread's own
        self._db: Backend | None = None  # the connection, with the sessions' log sizes
        self._connected = True  # False while the backend reconnects
        self._failed = 0
        self._last_ok = True
        self._unreported: list[tuple[int, str]] = []  # (seq, what failed) not yet raised by a sync()
        self._unreported_dropped = 0
        self._inflight: list[Op] = []
        self._thread = threading.Thread(target=self._main, name="arcp-store", daemon=True)
        self._thread.start()

    # -- writes -----------------------------------------------------------------
    def log_frame(self, session_id: str, seq: int, job_id: str, data: bytes) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        self._put(FRAME, (session_id, seq, job_id, data), len(data))

    def insert_job(self, job_id: str, principal: str, session_id: str, agent: str, status: str,
                   created_at: str, trace_id: str, idempotency_key: str | None, fingerprint: bytes | None,
                   record: dict[str, Any]) -> None:
        self._put(INSERT, (job_id, principal, session_id, agent, status, created_at, time.time_ns(), trace_id,
                            idempotency_key, fingerprint, orjson.dumps(record)))

    def finish_job(self, job_id: str, status: str, terminal: dict[str, Any], record: dict[str, Any]) -> None:
        self._put(FINISH, (status, orjson.dumps(terminal), orjson.dumps(record), time.time_ns(), job_id))

    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        ids = list(job_ids)
        if ids:
            self._put(DELETE, (ids,))

    def forget_session(self, session_id: str) -> None:
        self._put(FORGET, (session_id,))

    def add_credentials(self, job_id: str, credential_ids: list[str]) -> None:
        if credential_ids:
            self._put(CREDS, (job_id, list(credential_ids)))

    def revocation_attempted(self, credential_id: str, revoked: bool) -> None:
        self._put(REVOKED, (credential_id, revoked))

    async def claim_job(self, job_id: str, principal: str, session_id: str, agent: str, status: str,
                        created_at: str, trace_id: str, idempotency_key: str | None, fingerprint: bytes | None,
                        record: dict[str, Any]) -> StoredJob | None:
        result: StoredJob | None = await self._ask(CLAIM, (
            job_id, principal, session_id, agent, status, created_at, time.time_ns(), trace_id, idempotency_key,
            fingerprint, orjson.dumps(record)))
        return result

    # -- completion and reads -----------------------------------------------------
    async def sync(self) -> None:
        await self._ask(SYNC, ())

    async def recover(self, retention_jobs: int, retention_seconds: int) -> tuple[list[StoredJob], int]:
        result: tuple[list[StoredJob], int] = await self._ask(RECOVER, (retention_jobs, retention_seconds))
        return result

    async def terminal_of(self, job_id: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = await self._ask(TERMINAL, (job_id,))
        return result

    async def frames_since(self, session_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        result: list[tuple[int, bytes]] = await self._ask(SINCE, (session_id, after_seq))
        return result

    async def oldest_seq(self, session_id: str) -> int | None:
        result: int | None = await self._ask(OLDEST, (session_id,))
        return result

    async def job_frames(self, session_id: str, job_id: str, after_seq: int) -> list[bytes]:
        result: list[bytes] = await self._ask(JOB_FRAMES, (session_id, job_id, after_seq))
        return result

    async def unrevoked_credentials(self, finished_only: bool, finished_before_ns: int = 0) -> list[str]:
        result: list[str] = await self._ask(UNREVOKED, (finished_only, finished_before_ns))
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
                self._close_started = time.monotonic()
                self._close_called.set()  # a reconnection's backoff ends early
                self._seq += 1
                self._queue.append(Op(STOP, (), self._seq, 0, None, None))
                self._queued_ops += 1
        self._wake_now()
        await done
        self._thread.join()  # it has nothing left to do but return

    @property
    def failures(self) -> int:
        return self._failed + self._refused

    @property
    def healthy(self) -> bool:
        """False once closed or if the writer thread stopped, while the database is unreachable,
        while writes are refused for the queue's bound, and after a batch with a write that could
        not be committed (until a later batch commits all of its own)."""
        return (self._last_ok and self._connected and not self._closing and self._dead is None
                and self._thread.is_alive() and not self._over_bound(0))

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
                raise StoreError(f"{describe(kind, args)} refused: {self._dead}")
            if self._closing:
                raise StoreError(f"{describe(kind, args)} refused: the state store is closed")
            write = kind in WRITES
            if write and self._over_bound(nbytes):
                self._refused += 1
                log_refusal, self._refusing = not self._refusing, True
                waiting = (self._queued_ops, self._queued_bytes)
                refused = StoreError(f"{describe(kind, args)} refused: the state store's queue is full "
                                     f"({waiting[0]} operations, {waiting[1]} bytes of frames waiting)")
            else:
                if write and self._refusing:
                    log_recovery, self._refusing = True, False
                self._seq += 1
                self._queue.append(Op(kind, args, self._seq, nbytes, loop, waiter))
                self._queued_ops += 1
                self._queued_bytes += nbytes
        if refused is not None:
            if log_refusal:
                log.error("state store: %d operations and %d bytes of frames are waiting to be written; "
                          "refusing writes until they drain", *waiting)
            raise refused
        if log_recovery:
            log.warning("state store: accepting writes again (%d refused so far)", self._refused)
        self._kick(waiter is not None)

    async def writable(self) -> None:
        if self._queued_bytes <= HIGH_WATER_BYTES:  # (a read without the lock: a hint, checked below)
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._queued_bytes <= HIGH_WATER_BYTES or self._finished or self._dead is not None:
                return
            if self._room is None:
                self._room = (loop, asyncio.Event())
            room = self._room[1]
        await room.wait()

    async def _ask(self, kind: str, args: tuple[Any, ...]) -> Any:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._put(kind, args, 0, loop, waiter)
        return await waiter

    def _kick(self, urgent: bool) -> None:
        """Wake the writer. For an operation someone awaits (`urgent`: a read, a claim, a
        sync), or a queue of GROUP_OPS operations or GROUP_BYTES of frames, at the end of this
        loop turn, so that the turn's writes make one batch; for other writes within
        GROUP_DELAY, so that those of several turns (a job's acceptance, its events, its end)
        make one batch, and one wake of the thread instead of one per turn."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._wake_now()
            return
        if urgent or self._queued_ops >= GROUP_OPS or self._queued_bytes >= GROUP_BYTES:
            if self._wake_timer is not None:
                self._wake_timer.cancel()
                self._wake_timer = None
            if self._wake_loop is not loop:
                self._wake_loop = loop
                loop.call_soon(self._wake_now)
        elif self._wake_loop is None and self._wake_timer is None:
            self._wake_timer = loop.call_later(GROUP_DELAY, self._wake_grouped)

    def _wake_grouped(self) -> None:
        self._wake_timer = None
        if self._wake_loop is None and self._queue:  # (else a wake is due this turn, or came)
            self._wake_now()

    def _wake_now(self) -> None:
        self._wake_loop = None
        with self._cond:
            self._wake = True
            self._cond.notify()

    # -- the writer thread ----------------------------------------------------------
    # -- for the backend (on the writer thread) ----------------------------------------
    @abc.abstractmethod
    def _connect(self) -> Backend:
        """Open the database (on the writer thread); an exception says why it cannot be."""

    def _set_connected(self, connected: bool) -> None:
        self._connected = connected

    def _pause(self, seconds: float) -> None:
        """Wait (a reconnection's backoff), less if close() is called meanwhile, and at most half
        a second at a time once it has been."""
        if self._close_started is None:
            self._close_called.wait(seconds)
        else:
            time.sleep(min(seconds, 0.5))

    @property
    def _closing_since(self) -> float | None:
        """When close() was first called (time.monotonic()), or None."""
        return self._close_started

    def _main(self) -> None:
        try:
            self._db = self._connect()
        except Exception as e:
            log.error("state store: cannot open %s: %s", self.where, e)
            self._die(StoreError(f"cannot open the state database {self.where}: {e}"))
            return
        try:
            while True:
                batch = self._take()
                if not batch:
                    self._db.idle()
                    continue
                stop = bool(batch) and batch[-1].kind == STOP
                work = batch[:-1] if stop else batch
                if work:
                    self._run_batch(work)
                with self._lock:  # before the results: a caller they wake sees the queue without them
                    self._queued_ops -= len(batch)
                    self._queued_bytes -= sum(op.nbytes for op in batch)
                    room = None
                    if self._room is not None and self._queued_bytes <= LOW_WATER_BYTES:
                        room, self._room = self._room, None
                if room is not None:
                    room[0].call_soon_threadsafe(room[1].set)
                self._deliver(work)
                with self._lock:
                    self._inflight = []
                if stop:
                    break
        except StoreError as e:  # the backend gave up (a database still unreachable at close)
            log.error("state store: %s", e)
            self._die(e)
            return
        except BaseException as e:
            log.exception("state store: the writer thread failed")
            self._die(StoreError(f"the state store's writer thread failed: {e!r}"))
            return
        self._close_db()
        self._finish()

    def _take(self) -> list[Op]:
        with self._cond:
            waited: Op | None = None
            while not self._wake:
                if not self._cond.wait(timeout=1.0):
                    if not self._queue:
                        return []  # idle for a second: the backend may have housekeeping to do
                    if self._queue[0] is waited:
                        break  # queued a second ago or more on a loop that stopped before waking us
                    waited = self._queue[0]
            self._wake = False
            size, n = 0, 0
            for op in self._queue:  # at most BATCH_BYTES of frames (and at least one operation)
                if n and size + op.nbytes > BATCH_BYTES:
                    break
                size += op.nbytes
                n += 1
            batch, self._queue = self._queue[:n], self._queue[n:]
            if self._queue:
                self._wake = True  # the rest is the next batch, at once
            self._inflight = batch
        return batch

    def _run_batch(self, batch: list[Op]) -> None:
        """Apply a batch in one transaction (op by op if that fails), then count and report what failed."""
        self.batches += 1
        work = [op for op in batch if op.kind != SYNC]
        if work:
            assert self._db is not None
            self.commits += self._db.apply_batch(work)
        failed = [op for op in work if op.error is not None]
        if any(op.kind in WRITES for op in work):
            self._last_ok = not any(op.kind in WRITES for op in failed)
        for n, op in enumerate(failed):
            if op.kind in WRITES:
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
            if op.kind == SYNC:
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

    def _deliver(self, batch: list[Op]) -> None:
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
            if op.kind in WRITES:
                self._failed += 1
            op.result, op.error = None, StoreError(f"{describe(op.kind, op.args)}: {err}")
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
            room, self._room = self._room, None
        if room is not None:  # nothing will be written now: whoever waits for room goes on (and fails)
            try:
                room[0].call_soon_threadsafe(room[1].set)
            except RuntimeError:
                pass
        for loop, done in waiters:
            settled: list[tuple[asyncio.Future[Any], Any, StoreError | None]] = [(done, None, None)]
            try:
                loop.call_soon_threadsafe(_settle, settled)
            except RuntimeError:
                pass


def _settle(settled: list[tuple[asyncio.Future[Any], Any, StoreError | None]]) -> None:
    """On the event loop: hand results and errors to whoever still waits for them."""
    for fut, result, error in settled:
        if fut.done():  # the caller was cancelled
            continue
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)


__all__ = ("BATCH_BYTES", "Backend", "QueuedStore")
