"""Durable state in SQLite: job records and results, idempotency keys, and the
sequenced frames each session was sent (for resume and subscribe history).

With `--state-dir DIR` the database is `DIR/arcp-supervisor.sqlite3` in WAL
mode (the directory 0700, the database and its WAL and shared-memory files
0600); without it the same code runs on an in-memory database. Job rows are
written at once (acceptance and terminal), so an idempotent resubmission after
a crash finds them; frames are written in batches, once per event-loop turn.

Each session's frame log is bounded in bytes (`--session-log-bytes`): when a
batch takes it past the bound, its oldest frames are deleted in the same
transaction, down to TRIM_STEP below the bound, so a trim happens once per
TRIM_STEP bytes logged and deletes about that much. Deleted pages are reused by
later frames, and the WAL is cut back to WAL_LIMIT after checkpoints, so the
file holds about the bound per session plus the job records, whatever the jobs
emit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("arcp.store")
DB_NAME = "arcp-supervisor.sqlite3"
DEFAULT_LOG_BYTES = 64 * 1024 * 1024  # bytes of frames one session's resume/history log keeps
TRIM_STEP = 1024 * 1024  # a trim frees this much below the bound (an eighth of a smaller bound):
# trims stay rare, and short enough (a few thousand rows at most) not to stall the event loop
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


@dataclass
class StoredJob:
    job_id: str
    principal: str
    session_id: str
    agent: str
    status: str
    created_at: str
    trace_id: str
    idempotency_key: str | None
    fingerprint: bytes | None
    record: dict[str, Any]
    terminal: dict[str, Any] | None


class Store:
    def __init__(self, state_dir: str | None, session_log_bytes: int = DEFAULT_LOG_BYTES) -> None:
        if state_dir:
            path = _private_db(state_dir)
        else:
            path = ":memory:"
        self.path = path
        self.log_bytes = session_log_bytes
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        if path != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        self.db.executescript(SCHEMA)
        if path != ":memory:":
            _tighten(path)
        self._pending: list[tuple[str, int, str, bytes]] = []
        self._flush_scheduled = False
        self._log_size: dict[str, int] = {}  # live session -> bytes of its logged frames

    # -- jobs ---------------------------------------------------------------
    def insert_job(self, job_id: str, principal: str, session_id: str, agent: str, status: str,
                   created_at: str, trace_id: str, idempotency_key: str | None, fingerprint: bytes | None,
                   record: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO jobs (job_id, principal, session_id, agent, status, created_at, created_ns, trace_id,"
            " idempotency_key, fingerprint, record) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (job_id, principal, session_id, agent, status, created_at, time.time_ns(), trace_id,
             idempotency_key, fingerprint, orjson.dumps(record)))

    def finish_job(self, job_id: str, status: str, terminal: dict[str, Any], record: dict[str, Any]) -> None:
        self.flush()
        self.db.execute("UPDATE jobs SET status = ?, terminal = ?, record = ?, finished_ns = ? WHERE job_id = ?",
                        (status, orjson.dumps(terminal), orjson.dumps(record), time.time_ns(), job_id))

    def terminal_of(self, job_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT terminal FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return orjson.loads(row[0]) if row and row[0] is not None else None

    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        ids = [(j,) for j in job_ids]
        if not ids:
            return
        self.flush()
        self.db.execute("BEGIN")
        for (job_id,) in ids:
            for session_id, n in self.db.execute(
                    "SELECT session_id, SUM(length(frame)) FROM frames WHERE job_id = ? GROUP BY session_id",
                    (job_id,)).fetchall():
                if session_id in self._log_size:
                    self._log_size[session_id] = max(0, self._log_size[session_id] - (n or 0))
        self.db.executemany("DELETE FROM frames WHERE job_id = ?", ids)
        self.db.executemany("DELETE FROM jobs WHERE job_id = ?", ids)
        self.db.execute("COMMIT")

    def recover(self, retention_jobs: int, retention_seconds: int) -> tuple[list[StoredJob], int]:
        """After a restart: end jobs that were running, apply retention, return what is kept."""
        now = time.time_ns()
        interrupted = self.db.execute(
            "SELECT job_id FROM jobs WHERE finished_ns IS NULL").fetchall()
        for (job_id,) in interrupted:
            term = {"status": "error", "error": {
                "code": "INTERNAL_ERROR", "retryable": True,
                "message": "the supervisor restarted while the job was running"},
                "value": None, "result_id": None, "result_size": None,
                "completed_at": _ts(now)}
            self.db.execute("UPDATE jobs SET status='error', terminal=?, finished_ns=? WHERE job_id=?",
                            (orjson.dumps(term), now, job_id))
        old = self.db.execute(
            "SELECT job_id FROM jobs WHERE finished_ns < ?", (now - retention_seconds * 1_000_000_000,)
        ).fetchall()
        self.delete_jobs(j for (j,) in old)
        excess = self.db.execute(
            "SELECT job_id FROM jobs ORDER BY finished_ns DESC LIMIT -1 OFFSET ?", (retention_jobs,)).fetchall()
        self.delete_jobs(j for (j,) in excess)
        rows = self.db.execute(
            "SELECT job_id, principal, session_id, agent, status, created_at, trace_id, idempotency_key,"
            " fingerprint, record, terminal FROM jobs ORDER BY created_ns").fetchall()
        jobs = [StoredJob(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], orjson.loads(r[9]),
                          orjson.loads(r[10]) if r[10] is not None else None) for r in rows]
        return jobs, len(interrupted)

    # -- credentials ------------------------------------------------------------
    def add_credentials(self, job_id: str, credential_ids: list[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO credentials (credential_id, job_id) VALUES (?, ?)",
                            [(c, job_id) for c in credential_ids])

    def revocation_attempted(self, credential_id: str, revoked: bool) -> None:
        if revoked:
            self.db.execute("DELETE FROM credentials WHERE credential_id = ?", (credential_id,))
        else:
            self.db.execute("UPDATE credentials SET attempts = attempts + 1 WHERE credential_id = ?",
                            (credential_id,))

    def unrevoked_credentials(self, finished_only: bool) -> list[str]:
        """Credentials still to revoke (of finished jobs, or of every job after a restart)."""
        query = "SELECT c.credential_id FROM credentials c"
        if finished_only:
            query += " JOIN jobs j ON j.job_id = c.job_id WHERE j.finished_ns IS NOT NULL"
        return [r[0] for r in self.db.execute(query)]

    # -- frames ---------------------------------------------------------------
    def log_frame(self, session_id: str, seq: int, job_id: str, data: bytes) -> None:
        self._pending.append((session_id, seq, job_id, data))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (tests): flush now
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        grown: dict[str, tuple[int, int]] = {}  # session -> (bytes added, newest seq)
        for session_id, seq, _, data in pending:
            added, newest = grown.get(session_id, (0, 0))
            grown[session_id] = (added + len(data), max(newest, seq))
        self.db.execute("BEGIN")
        try:
            self.db.executemany("INSERT OR REPLACE INTO frames (session_id, seq, job_id, frame) VALUES (?,?,?,?)",
                                pending)
            for session_id, (added, newest) in grown.items():
                size = self._log_size.get(session_id, 0) + added
                if size > self.log_bytes:
                    size = self._trim(session_id, size, newest)
                self._log_size[session_id] = size
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _trim(self, session_id: str, size: int, newest: int) -> int:
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

    def frames_since(self, session_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        self.flush()
        return self.db.execute(
            "SELECT seq, frame FROM frames WHERE session_id = ? AND seq > ? ORDER BY seq",
            (session_id, after_seq)).fetchall()

    def oldest_seq(self, session_id: str) -> int | None:
        self.flush()
        row = self.db.execute("SELECT MIN(seq) FROM frames WHERE session_id = ?", (session_id,)).fetchone()
        return row[0] if row else None

    def job_frames(self, session_id: str, job_id: str, after_seq: int) -> list[bytes]:
        self.flush()
        return [r[0] for r in self.db.execute(
            "SELECT frame FROM frames WHERE job_id = ? AND session_id = ? AND seq > ? ORDER BY seq",
            (job_id, session_id, after_seq))]

    def forget_session(self, session_id: str) -> None:
        """A session past its resume window: its copies of other sessions' jobs go."""
        self.flush()
        self._log_size.pop(session_id, None)
        self.db.execute("DELETE FROM frames WHERE session_id = ? AND job_id NOT IN "
                        "(SELECT job_id FROM jobs WHERE session_id = ?)", (session_id, session_id))

    def close(self) -> None:
        self.flush()
        self.db.close()


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


def _ts(ns: int) -> str:
    from shared.ids import format_ts

    return format_ts(ns / 1e9)
