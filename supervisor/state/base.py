"""The state store's interface, whatever database is behind it.

A store keeps job records and results, the credentials still to revoke, and the
sequenced frames each session was sent (for resume and subscribe history).

Writes are queued, not awaited: each write method returns at once and the
store applies writes in the order they were queued. `sync()` waits until
everything queued before it is committed and raises `StoreError` if any of it
could not be. Reads are awaited and see every write queued before them. A
write that cannot be committed is logged, counted in `failures`, and reported
by the next `sync()`; it never fails silently, and it does not take the writes
queued with it down too. `claim_job()` is the one awaited write: an insert that tells its
caller whether the job's idempotency key was free (for several supervisors on one database).

Two implementations: SqliteStore (sqlite.py) and PostgresStore (postgres.py), one engine
(queued.py) with a database each.

Each session's frame log is bounded in bytes (`session_log_bytes`): when
logging takes it past the bound, its oldest frames are deleted (never its
newest one) until it is below the bound again by a trim step, so trims stay
rare. Deleting jobs (retention) takes their frames off the tally, and
forgetting a session drops its tally.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

DEFAULT_LOG_BYTES = 64 * 1024 * 1024  # bytes of frames one session's resume/history log keeps
MAX_QUEUED_OPS = 100_000  # operations waiting to be applied before writes are refused
MAX_QUEUED_BYTES = 256 * 1024 * 1024  # bytes of frames waiting to be applied before writes are refused
HIGH_WATER_BYTES = 16 * 1024 * 1024  # past this many bytes of frames waiting, writable() waits
LOW_WATER_BYTES = 4 * 1024 * 1024  # ... until they are down to this
RESTART_MESSAGE = "the supervisor restarted while the job was running"


class StoreError(Exception):
    """Something could not be written or read; `failed` names each operation that failed."""

    def __init__(self, message: str, failed: list[str] | None = None) -> None:
        super().__init__(message)
        self.failed = failed if failed is not None else [message]


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


def interrupted_terminal(now_ns: int) -> dict[str, Any]:
    """The terminal outcome recover() gives a job that was running when the supervisor stopped."""
    from shared.ids import format_ts

    return {"status": "error", "error": {"code": "INTERNAL_ERROR", "retryable": True, "message": RESTART_MESSAGE},
            "value": None, "result_id": None, "result_size": None, "completed_at": format_ts(now_ns / 1e9)}


class StateStore(abc.ABC):
    """Job records, credentials and session frame logs; see the module docstring for the contract."""

    # -- writes: queued, applied in order; StoreError if the store is closed or its queue is full --
    @abc.abstractmethod
    def log_frame(self, session_id: str, seq: int, job_id: str, data: bytes) -> None:
        """Log a frame sent on a session (replacing one with the same seq); trims the session's log."""

    @abc.abstractmethod
    def insert_job(self, job_id: str, principal: str, session_id: str, agent: str, status: str,
                   created_at: str, trace_id: str, idempotency_key: str | None, fingerprint: bytes | None,
                   record: dict[str, Any]) -> None:
        """A job accepted (the record is serialised at the call)."""

    @abc.abstractmethod
    def finish_job(self, job_id: str, status: str, terminal: dict[str, Any], record: dict[str, Any]) -> None:
        """A job's terminal outcome and final record (serialised at the call)."""

    @abc.abstractmethod
    def delete_jobs(self, job_ids: Iterable[str]) -> None:
        """Jobs past retention go, with their frames (which leave the sessions' tallies)."""

    @abc.abstractmethod
    def forget_session(self, session_id: str) -> None:
        """A session past its resume window: its copies of other sessions' jobs' frames go."""

    @abc.abstractmethod
    def add_credentials(self, job_id: str, credential_ids: list[str]) -> None:
        """Credentials issued to a job, to revoke once it ends (or after a restart)."""

    @abc.abstractmethod
    def revocation_attempted(self, credential_id: str, revoked: bool) -> None:
        """Revoked: the credential is forgotten; not revoked: one more attempt is counted."""

    def job_running(self, job_id: str) -> None:
        """A job has started (a store that other processes read keeps its status; no other
        store needs to: queued like any write)."""
        return None

    # -- an awaited write ---------------------------------------------------------
    @abc.abstractmethod
    async def claim_job(self, job_id: str, principal: str, session_id: str, agent: str, status: str,
                        created_at: str, trace_id: str, idempotency_key: str | None, fingerprint: bytes | None,
                        record: dict[str, Any]) -> StoredJob | None:
        """insert_job, awaited and committed: None once the job is stored, or the stored job that
        already holds (principal, idempotency_key), and then nothing is written. Ordered with the
        queued writes like a read; StoreError to the caller (not to a sync()) if it cannot be done,
        e.g. a job with this id exists. What a submit with an idempotency key awaits when several
        supervisors share one database: exactly one of them gets None for a key."""

    # -- completion -----------------------------------------------------------
    @property
    def durable(self) -> bool:
        """Whether what it commits outlives the process (a database on disk, not in memory)."""
        return True

    async def writable(self) -> None:
        """Return once the frames waiting to be written are below the store's high-water mark
        (at once when they are): what a producer that can wait (a job's pump) awaits, so
        that a flood is held at its source instead of queued in memory."""
        return None

    @abc.abstractmethod
    async def sync(self) -> None:
        """Return once everything queued before the call is committed; StoreError naming the writes
        that could not be (those not reported by an earlier sync())."""

    # -- reads: see every write queued before them; StoreError if the read itself fails --
    @abc.abstractmethod
    async def recover(self, retention_jobs: int, retention_seconds: int) -> tuple[list[StoredJob], int]:
        """After a restart: end the jobs that were running (INTERNAL_ERROR, retryable), delete jobs
        finished more than retention_seconds ago and all but the retention_jobs most recently
        finished; return the jobs kept (oldest first) and how many were ended."""

    @abc.abstractmethod
    async def terminal_of(self, job_id: str) -> dict[str, Any] | None:
        """The stored terminal outcome of a job, or None."""

    @abc.abstractmethod
    async def frames_since(self, session_id: str, after_seq: int) -> list[tuple[int, bytes]]:
        """(seq, frame) of the session's logged frames after after_seq, in order."""

    @abc.abstractmethod
    async def oldest_seq(self, session_id: str) -> int | None:
        """The seq of the session's oldest logged frame, or None."""

    @abc.abstractmethod
    async def job_frames(self, session_id: str, job_id: str, after_seq: int) -> list[bytes]:
        """A job's frames in a session's log after after_seq, in order."""

    @abc.abstractmethod
    async def unrevoked_credentials(self, finished_only: bool, finished_before_ns: int = 0) -> list[str]:
        """Credentials still to revoke: of finished jobs (those finished before
        `finished_before_ns`, wall-clock ns, if given), or of every job (after a restart)."""

    # -- lifetime and health ------------------------------------------------------
    @abc.abstractmethod
    async def close(self) -> None:
        """Apply everything queued, then close; idempotent. Every call after it raises StoreError."""

    @property
    @abc.abstractmethod
    def failures(self) -> int:
        """Writes that could not be committed (or were refused), since the store was opened."""

    @property
    @abc.abstractmethod
    def healthy(self) -> bool:
        """Open, accepting writes, and the latest writes were committed."""
