"""The state store in SQLite, applied by one thread of its own (see base.py for the contract,
queued.py for the writer thread, its batches, failures and queue bound, which SqliteStore shares
with PostgresStore).

With a state dir the database is `DIR/arcp-supervisor.sqlite3` in WAL mode with
synchronous=NORMAL (the directory 0700, the database and its WAL and
shared-memory files 0600); without one the same code runs on an in-memory
database. If even BEGIN fails during a failed batch's one-by-one pass (the
database is locked past the busy timeout, or unusable), the rest of the batch
fails with that error without further attempts.

Each session's frame log is bounded in bytes (`session_log_bytes`; see sqlite_ops.py for
the trimming), and the database file's modes are kept private (sqlite_files.py).
"""

from __future__ import annotations

from supervisor.state.base import DEFAULT_LOG_BYTES, MAX_QUEUED_BYTES, MAX_QUEUED_OPS
from supervisor.state.queued import BATCH_BYTES, Backend, QueuedStore
from supervisor.state.sqlite_files import DB_NAME, private_db
from supervisor.state.sqlite_ops import Database


class SqliteStore(QueuedStore):
    def __init__(self, state_dir: str | None, session_log_bytes: int = DEFAULT_LOG_BYTES, *,
                 max_queued_ops: int = MAX_QUEUED_OPS, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        """Start the writer thread, which opens the database; `await SqliteStore.open(...)` also
        waits for that and raises StoreError if it fails (otherwise the first operations do)."""
        self.path = private_db(state_dir) if state_dir else ":memory:"
        super().__init__(self.path, session_log_bytes, max_queued_ops=max_queued_ops,
                         max_queued_bytes=max_queued_bytes)

    @classmethod
    async def open(cls, state_dir: str | None, session_log_bytes: int = DEFAULT_LOG_BYTES,
                   **bounds: int) -> SqliteStore:
        store = cls(state_dir, session_log_bytes, **bounds)
        await store.sync()
        return store

    @property
    def durable(self) -> bool:
        return self.path != ":memory:"

    def _connect(self) -> Backend:
        return Database(self.path, self.log_bytes)


__all__ = ("BATCH_BYTES", "DB_NAME", "SqliteStore")
