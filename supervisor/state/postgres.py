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

import asyncio
import logging
from collections.abc import Callable

import orjson

from supervisor.state.base import DEFAULT_LOG_BYTES, MAX_QUEUED_BYTES, MAX_QUEUED_OPS, StoredJob
from supervisor.state.ops import (
    COMMAND, COMMANDS_TAKE, FOLLOW, JOB_GET, JOBS_OF, NODE_GONE, RELAY, RELAY_TAKE, RUNNING, SESSION_DROP, SESSION_GET, SESSION_PUT, SESSION_TAKE,
)
from supervisor.state.postgres_cluster import token_hash
from supervisor.state.postgres_listen import Listener, Notify
from supervisor.state.postgres_ops import PgDatabase, Settings
from supervisor.state.postgres_schema import SCHEMA_VERSION
from supervisor.state.queued import Backend, QueuedStore

log = logging.getLogger("arcp.store")


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class PostgresStore(QueuedStore):
    def __init__(self, url: str, session_log_bytes: int = DEFAULT_LOG_BYTES, *, node_id: str | None = None,
                 max_queued_ops: int = MAX_QUEUED_OPS, max_queued_bytes: int = MAX_QUEUED_BYTES,
                 connect_timeout: int = 10, close_timeout: float = 30.0, node_heartbeat: float = 2.0,
                 node_timeout: float = 10.0, resume_window: float = 600.0) -> None:
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
        self.node_heartbeat = node_heartbeat
        self.node_timeout = node_timeout
        self.resume_window = resume_window
        self.fenced_by: str | None = None  # the node that declared this one lost, once one has
        self.on_fenced: Callable[[str], None] | None = None  # called on the loop that set it
        self._fence_loop: asyncio.AbstractEventLoop | None = None
        self._listener: Listener | None = None
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
                                         self.connect_timeout, self.close_timeout, self.node_heartbeat,
                                         self.node_timeout, self.resume_window))

    # -- several nodes (supervisor/state/postgres_cluster.py) ---------------------------
    def listen(self, notify: Notify, on_fenced: Callable[[str], None]) -> None:
        """Hand every relay and command announcement to `notify` on this event loop (and
        `(RECONNECTED, "")` after the listening connection was lost and found again); call
        `on_fenced(by)` there if another node declares this one lost."""
        loop = asyncio.get_running_loop()
        self.on_fenced, self._fence_loop = on_fenced, loop
        if self.fenced_by is not None:
            loop.call_soon(on_fenced, self.fenced_by)
        self._listener = Listener(self.url, self.connect_timeout, loop, notify)

    @property
    def fenced(self) -> bool:
        """Declared lost by another node: writes are dropped (supervisor/state/postgres_ops.py)."""
        return self.fenced_by is not None

    def _fence(self, by: str) -> None:
        """(writer thread) Another node has declared this one lost."""
        if self.fenced_by is not None:
            return
        self.fenced_by = by
        log.error("state store: node %s was declared lost by node %s: it must stop", self.node_id, by)
        if self.on_fenced is not None and self._fence_loop is not None:
            try:
                self._fence_loop.call_soon_threadsafe(self.on_fenced, by)
            except RuntimeError:
                pass

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            await asyncio.get_running_loop().run_in_executor(None, listener.close)
        await super().close()

    def put_session(self, session_id: str, principal: str, token: str, seq: int, *, detached: bool, closed: bool,
                    flavour: str, node_id: str | None = None) -> None:
        """This node (or `node_id`, which it is handed over to) numbers the session's frames,
        with this resume token."""
        self._put(SESSION_PUT, (session_id, node_id or self.node_id, principal, token_hash(token), seq, detached,
                                closed, flavour))

    def job_running(self, job_id: str) -> None:
        self._put(RUNNING, (job_id,))

    def drop_session(self, session_id: str) -> None:
        """A session past its resume window (if this node holds it), with its relay rows."""
        self._put(SESSION_DROP, (session_id,))

    def relay(self, session_id: str, job_id: str, env: dict[str, Any], *, logged: bool = True) -> None:
        """A frame (without its event_seq) for a session another node numbers."""
        body = orjson.dumps(env)
        self._put(RELAY, (session_id, job_id, "frame", body, logged), len(body))

    def command(self, message: dict[str, Any]) -> None:
        """A command to another node (message["to"]), kept in the database and announced once
        what was queued before it is committed."""
        self._put(COMMAND, (str(message["to"]), orjson.dumps(message)))

    async def take_commands(self) -> list[bytes]:
        """The oldest commands to this node (at most 256), in order; gone once read."""
        rows: list[bytes] = await self._ask(COMMANDS_TAKE, (self.node_id,))
        return rows

    async def session_row(self, session_id: str) -> dict[str, Any] | None:
        """A session's row (see postgres_cluster.session_row), or None."""
        row: dict[str, Any] | None = await self._ask(SESSION_GET, (session_id,))
        return row

    async def node_gone(self, node_id: str) -> bool:
        """Whether another node is lost (declared so now if its connection is gone and its
        heartbeats have stopped: postgres_cluster.node_gone)."""
        return bool(await self._ask(NODE_GONE, (node_id,)))

    async def take_session(self, session_id: str, from_node: str) -> bool:
        """The session is this node's now, if it still was `from_node`'s."""
        return bool(await self._ask(SESSION_TAKE, (session_id, from_node)))

    async def take_relay(self, session_id: str, limit: int) -> list[tuple[str, str, bytes, bool]]:
        """(job_id, kind, body, logged) of the oldest frames relayed to the session (at most
        `limit`), in order; gone from the database once read."""
        rows: list[tuple[str, str, bytes, bool]] = await self._ask(RELAY_TAKE, (session_id, limit))
        return rows

    def follow(self, job_id: str, session_id: str, follows: bool = True) -> None:
        """A session follows (or no longer follows) a running job: a lost node's terminal of it
        reaches it too."""
        self._put(FOLLOW, (job_id, session_id, follows))

    async def job_row(self, job_id: str) -> tuple[StoredJob, str] | None:
        """A job of any node, with the node running it (or that ran it)."""
        row: tuple[StoredJob, str] | None = await self._ask(JOB_GET, (job_id,))
        return row

    async def jobs_of(self, principal: str | None) -> list[tuple[StoredJob, str]]:
        """Every node's jobs (of one principal, or all), oldest first, with their node."""
        rows: list[tuple[StoredJob, str]] = await self._ask(JOBS_OF, (principal,))
        return rows


def _redacted(url: str) -> str:
    """The URL without its password, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{userinfo}{at}{hostpart}"


__all__ = ("SCHEMA_VERSION", "PostgresStore", "default_node_id")
