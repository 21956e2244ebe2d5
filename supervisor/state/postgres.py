"""The state store in PostgreSQL (see base.py for the contract), for several supervisor processes
sharing one database.

The same engine as SqliteStore (queued.py): one writer thread with one synchronous psycopg 3
connection, every operation in one FIFO queue, each batch applied in ONE transaction
(READ COMMITTED), a failed batch rolled back and applied again one op per transaction, writes
refused (StoreError, counted in `failures`) past max_queued_ops / max_queued_bytes. A thread
rather than an asyncio connection: the event loop then never runs a driver's code (encoding a
batch of frames, decoding recover()'s rows), several event loops may share a store as they may
SqliteStore's, and both stores share one engine, tested once.

What is in memory: the queue (bounded as above), each live session's frame-log byte tally
(a trigger for the trim, which then counts in the database) and the unreported failures. What
is in the database: everything else (schema: postgres_schema.py), created or migrated at open;
a database whose schema is newer than this code's is refused (StoreError naming both versions).

Several supervisors ("nodes") on one database: each store has a `node_id` (by default
"HOSTNAME-PID"), stamped on the jobs it inserts, a row in `nodes` (started_at, heartbeat_at
renewed every 10 s) and, for as long as its connection lives, an advisory lock on its id.
recover() ends the running jobs of this node and of nodes whose lock is free (dead ones),
applies retention to every node's finished jobs, and returns the finished jobs (another live
node's running jobs are its own). A job's idempotency key is unique per principal across
nodes: `claim_job()` (an awaited insert) tells its caller which job holds a key; insert_job()
of a job whose key is held fails like any write, reported by sync().

Connection loss: the writer reconnects with a backoff of 0.1 s doubling up to 5 s, forever
while the store is open, at most `close_timeout` seconds once close() is called (then what is
still queued fails, counted and logged). The batch it was applying is applied again, whole,
once reconnected (its writes are idempotent: see postgres_ops.py); writes queue up meanwhile in
memory within the queue's bounds, reads wait, and `healthy` is False until it is back.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from typing import Any

from supervisor.state.base import DEFAULT_LOG_BYTES, MAX_QUEUED_BYTES, MAX_QUEUED_OPS
from supervisor.state.postgres_ops import PgDatabase, Settings
from supervisor.state.postgres_schema import SCHEMA_VERSION
from supervisor.state.queued import Backend, QueuedStore


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class PostgresStore(QueuedStore):
    def __init__(self, url: str, session_log_bytes: int = DEFAULT_LOG_BYTES, *, node_id: str | None = None,
                 max_queued_ops: int = MAX_QUEUED_OPS, max_queued_bytes: int = MAX_QUEUED_BYTES,
                 connect_timeout: int = 10, close_timeout: float = 30.0) -> None:
        """Start the writer thread, which connects to `url` (postgresql://...), creates or migrates
        the schema and registers this node; `await PostgresStore.open(...)` also waits for that
        and raises StoreError if it fails (otherwise the first operations do)."""
        if not url.startswith(("postgresql://", "postgres://")):
            raise ValueError("a PostgreSQL state store's URL starts with postgresql://")
        self.url = url
        self.node_id = node_id or default_node_id()
        self.connect_timeout = connect_timeout  # seconds one connection attempt may take
        self.close_timeout = close_timeout  # seconds close() waits for an unreachable database
        self.started_at = datetime.now(timezone.utc)
        super().__init__(_redacted(url), session_log_bytes, max_queued_ops=max_queued_ops,
                         max_queued_bytes=max_queued_bytes)

    @classmethod
    async def open(cls, url: str, session_log_bytes: int = DEFAULT_LOG_BYTES, **options: Any) -> PostgresStore:
        store = cls(url, session_log_bytes, **options)
        await store.sync()
        return store

    @property
    def connected(self) -> bool:
        """Whether the writer has its connection (False while it reconnects)."""
        return self._connected

    def _connect(self) -> Backend:
        return PgDatabase(self, Settings(self.url, self.node_id, self.started_at, self.log_bytes,
                                         self.connect_timeout, self.close_timeout))


def _redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{hostpart}"


__all__ = ("SCHEMA_VERSION", "PostgresStore", "default_node_id")
