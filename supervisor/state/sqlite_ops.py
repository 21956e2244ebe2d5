"""The state store's operations on its SQLite connection (supervisor/state/sqlite.py): the
schema, the operations queued to the writer thread and how each is named in logs and errors,
and the SQL each applies, run by that thread inside the transaction it has begun.

Each session's frame log is bounded in bytes (`session_log_bytes`): when a run
of frames takes it past the bound, its oldest frames are deleted in the same
transaction, down to TRIM_STEP below the bound, so a trim happens about once per
TRIM_STEP bytes logged. Deleted pages are reused by later frames, and the WAL is
cut back to WAL_LIMIT after checkpoints, so the file holds about the bound per
session plus the job records, whatever the jobs emit.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

import orjson

from supervisor.state.base import StoredJob, StoreError, interrupted_terminal
from supervisor.state.ops import (
    CLAIM, CREDS, DELETE, FINISH, FORGET, INSERT, JOB_COLUMNS, JOB_FRAMES, OLDEST, RECOVER, REVOKED, SINCE,
    TERMINAL, UNREVOKED, BatchApplier, Op, Undo, describe, stored_job,
)
from supervisor.state.sqlite_files import tighten

log = logging.getLogger("arcp.store")
TRIM_STEP = 1024 * 1024  # a trim frees this much below the bound (an eighth of a smaller bound):
# trims stay rare and short (a few thousand rows at most)
WAL_LIMIT = 8 * 1024 * 1024  # the WAL is truncated to this after a checkpoint

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

def connect(path: str) -> sqlite3.Connection:
    """The database at `path` (or ":memory:") with its schema; only the calling thread may use it."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        if path != ":memory:":
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        db.executescript(SCHEMA)
        if path != ":memory:":
            tighten(path)
    except BaseException:
        db.close()
        raise
    return db


class Database(BatchApplier):
    """The writer thread's connection, with the byte tally of each live session's frame log that
    it keeps beside it (a rolled-back transaction's changes to the tallies are undone too)."""

    def __init__(self, path: str, log_bytes: int) -> None:
        self.db = connect(path)
        self.log_bytes = log_bytes
        self.log_size: dict[str, int] = {}  # live session -> bytes of its logged frames

    def close(self) -> None:
        self.db.close()

    def idle(self) -> None:
        """Nothing to do while the queue is empty."""

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self, undo: Undo) -> None:
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except Exception:
            log.exception("state store: ROLLBACK failed")
        self.restore_sizes(undo)

    def apply_batch(self, ops: list[Op]) -> int:
        """Apply `ops` in one transaction; if that fails, roll it back and apply them one per
        transaction, each one's failure in its `error`. Returns the transactions committed."""
        undo: Undo = {}
        try:
            self.begin()
            self.apply_all(ops, undo)
            self.commit()
            return 1
        except Exception as e:
            self.rollback(undo)
            for op in ops:
                op.result = None
            log.warning("state store: a batch of %d operations failed (%s: %s); applying them one at a time",
                        len(ops), type(e).__name__, e)
            return self.apply_one_by_one(ops)

    def apply_one_by_one(self, ops: list[Op]) -> int:
        committed = 0
        broken: str | None = None  # BEGIN itself failed: the rest is not tried
        for op in ops:
            if broken is not None:
                op.error = StoreError(f"{describe(op.kind, op.args)}: not attempted: {broken}")
                continue
            undo: Undo = {}
            try:
                self.begin()
            except Exception as e:
                broken = f"{type(e).__name__}: {e}"
                op.error = StoreError(f"{describe(op.kind, op.args)}: {broken}")
                self.rollback(undo)
                continue
            try:
                self.apply_one(op, undo)
                self.commit()
                committed += 1
            except Exception as e:
                self.rollback(undo)
                op.result = None
                op.error = StoreError(f"{describe(op.kind, op.args)}: {type(e).__name__}: {e}")
        return committed

    def apply(self, op: Op, undo: Undo) -> Any:
        db = self.db
        k, a = op.kind, op.args
        if k == INSERT:
            db.execute("INSERT INTO jobs (job_id, principal, session_id, agent, status, created_at, created_ns,"
                       " trace_id, idempotency_key, fingerprint, record) VALUES (?,?,?,?,?,?,?,?,?,?,?)", a)
        elif k == FINISH:
            db.execute("UPDATE jobs SET status = ?, terminal = ?, record = ?, finished_ns = ? WHERE job_id = ?", a)
        elif k == DELETE:
            self.delete_jobs(a[0], undo)
        elif k == FORGET:
            session_id = a[0]
            self.set_size(session_id, None, undo)
            db.execute("DELETE FROM frames WHERE session_id = ? AND job_id NOT IN "
                       "(SELECT job_id FROM jobs WHERE session_id = ?)", (session_id, session_id))
        elif k == CREDS:
            job_id, credential_ids = a
            db.executemany("INSERT OR IGNORE INTO credentials (credential_id, job_id) VALUES (?, ?)",
                           [(c, job_id) for c in credential_ids])
        elif k == REVOKED:
            credential_id, revoked = a
            if revoked:
                db.execute("DELETE FROM credentials WHERE credential_id = ?", (credential_id,))
            else:
                db.execute("UPDATE credentials SET attempts = attempts + 1 WHERE credential_id = ?",
                           (credential_id,))
        elif k == CLAIM:
            return self.claim(a)
        elif k == RECOVER:
            return self.recover(a[0], a[1], undo)
        elif k == TERMINAL:
            row = db.execute("SELECT terminal FROM jobs WHERE job_id = ?", a).fetchone()
            return orjson.loads(row[0]) if row and row[0] is not None else None
        elif k == SINCE:
            return db.execute("SELECT seq, frame FROM frames WHERE session_id = ? AND seq > ? ORDER BY seq",
                              a).fetchall()
        elif k == OLDEST:
            row = db.execute("SELECT MIN(seq) FROM frames WHERE session_id = ?", a).fetchone()
            return row[0] if row else None
        elif k == JOB_FRAMES:
            session_id, job_id, after_seq = a
            return [r[0] for r in db.execute(
                "SELECT frame FROM frames WHERE job_id = ? AND session_id = ? AND seq > ? ORDER BY seq",
                (job_id, session_id, after_seq))]
        elif k == UNREVOKED:
            query = "SELECT c.credential_id FROM credentials c"
            if a[0]:
                query += " JOIN jobs j ON j.job_id = c.job_id WHERE j.finished_ns IS NOT NULL"
                if a[1]:
                    query += f" AND j.finished_ns < {int(a[1])}"
            return [r[0] for r in db.execute(query)]
        else:
            raise AssertionError(f"unknown operation {k!r}")
        return None

    def set_size(self, session_id: str, size: int | None, undo: Undo) -> None:
        if session_id not in undo:
            undo[session_id] = self.log_size.get(session_id)
        if size is None:
            self.log_size.pop(session_id, None)
        else:
            self.log_size[session_id] = size

    def log_frames(self, rows: list[tuple[Any, ...]], undo: Undo) -> None:
        grown: dict[str, tuple[int, int]] = {}  # session -> (bytes added, newest seq)
        for session_id, seq, _, data in rows:
            added, newest = grown.get(session_id, (0, 0))
            grown[session_id] = (added + len(data), max(newest, seq))
        self.db.executemany("INSERT OR REPLACE INTO frames (session_id, seq, job_id, frame) VALUES (?,?,?,?)", rows)
        for session_id, (added, newest) in grown.items():
            size = self.log_size.get(session_id, 0) + added
            if size > self.log_bytes:
                size = self.trim(session_id, size, newest)
            self.set_size(session_id, size, undo)

    def trim(self, session_id: str, size: int, newest: int) -> int:
        """Delete a session's oldest frames until its log is below the trim target (never its
        newest frame, which fits the bound alone); return the bytes left."""
        target = self.log_bytes - min(self.log_bytes // 8, TRIM_STEP)
        cut = None
        cur = self.db.execute("SELECT seq, length(frame) FROM frames WHERE session_id = ? AND seq < ? ORDER BY seq",
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
            self.db.execute("DELETE FROM frames WHERE session_id = ? AND seq <= ?", (session_id, cut))
        return size

    def delete_jobs(self, job_ids: list[str], undo: Undo) -> None:
        db = self.db
        ids = [(j,) for j in job_ids]
        if not ids:
            return
        for (job_id,) in ids:
            for session_id, n in db.execute(
                    "SELECT session_id, SUM(length(frame)) FROM frames WHERE job_id = ? GROUP BY session_id",
                    (job_id,)).fetchall():
                if session_id in self.log_size:
                    self.set_size(session_id, max(0, self.log_size[session_id] - (n or 0)), undo)
        db.executemany("DELETE FROM frames WHERE job_id = ?", ids)
        db.executemany("DELETE FROM jobs WHERE job_id = ?", ids)

    def recover(self, retention_jobs: int, retention_seconds: int, undo: Undo) -> tuple[list[StoredJob], int]:
        db = self.db
        now = time.time_ns()
        interrupted = db.execute("SELECT job_id FROM jobs WHERE finished_ns IS NULL").fetchall()
        if interrupted:
            term = orjson.dumps(interrupted_terminal(now))
            db.executemany("UPDATE jobs SET status = 'error', terminal = ?, finished_ns = ? WHERE job_id = ?",
                           [(term, now, job_id) for (job_id,) in interrupted])
        old = db.execute("SELECT job_id FROM jobs WHERE finished_ns < ?",
                         (now - retention_seconds * 1_000_000_000,)).fetchall()
        self.delete_jobs([j for (j,) in old], undo)
        excess = db.execute("SELECT job_id FROM jobs ORDER BY finished_ns DESC LIMIT -1 OFFSET ?",
                            (retention_jobs,)).fetchall()
        self.delete_jobs([j for (j,) in excess], undo)
        rows = db.execute(f"SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_ns").fetchall()
        return [stored_job(r) for r in rows], len(interrupted)

    def claim(self, a: tuple[Any, ...]) -> StoredJob | None:
        """Insert a job unless its idempotency key is taken: None, or the job that holds the key."""
        cur = self.db.execute("INSERT OR IGNORE INTO jobs (job_id, principal, session_id, agent, status, created_at,"
                              " created_ns, trace_id, idempotency_key, fingerprint, record)"
                              " VALUES (?,?,?,?,?,?,?,?,?,?,?)", a)
        if cur.rowcount == 1:
            return None
        job_id, principal, key = a[0], a[1], a[8]
        if key is not None:
            row = self.db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE principal = ? AND idempotency_key = ?",
                                  (principal, key)).fetchone()
            if row is not None and row[0] != job_id:
                return stored_job(row)
        raise StoreError(f"{describe(CLAIM, a)}: a job with this id exists already")
