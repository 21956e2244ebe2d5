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

This synchronous store runs on the event loop; sqlite.py's SqliteStore is the same
store on a thread of its own, and shares its schema and the state dir's handling.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

import orjson

from supervisor.state.base import DEFAULT_LOG_BYTES, StoredJob, interrupted_terminal
from supervisor.state.sqlite import DB_NAME, SCHEMA, TRIM_STEP, WAL_LIMIT, _private_db, _tighten

__all__ = ["DB_NAME", "DEFAULT_LOG_BYTES", "SCHEMA", "TRIM_STEP", "WAL_LIMIT", "Store", "StoredJob"]


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
            term = interrupted_terminal(now)
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
