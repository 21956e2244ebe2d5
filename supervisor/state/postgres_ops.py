"""The PostgreSQL store's connection and the SQL of each operation (supervisor/state/postgres.py),
run by the store's writer thread: batches in one transaction, a failed batch rolled back and
applied again op by op, and a lost connection found again (with a bounded backoff) without
losing or repeating the batch's effects.

A batch interrupted by a lost connection is applied again, whole, once connected: every write is
idempotent for that reason (a COMMIT whose answer was lost may have committed): frames are
upserted, an insert of a job whose row exists with the same node and creation time is taken as
done, credentials are inserted ON CONFLICT DO NOTHING, finishes and deletes set what they set.
(A revocation attempt counted by a lost COMMIT may be counted twice: it only counts attempts.)

Frame-log bound: each session's bytes are tallied in memory, as in SQLite; when a tally passes
the bound, the trim reads the session's real size from the database (so a tally that drifted,
e.g. over a batch applied twice, is put right) and deletes its oldest frames down to the trim
target, never its newest one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import orjson
import psycopg

from supervisor.state.base import StoredJob, StoreError, interrupted_terminal
from supervisor.state.ops import (
    CLAIM, CLUSTER_KINDS, CREDS, DELETE, FINISH, FORGET, INSERT, JOB_COLUMNS, JOB_FRAMES, OLDEST, RECOVER, REVOKED, SINCE,
    TERMINAL, UNREVOKED, WRITES, BatchApplier, Op, Undo, describe, stored_job,
)
from supervisor.state import postgres_cluster as cluster
from supervisor.state.postgres_schema import migrate


class NodeStore(Protocol):
    """What the connection asks of its store (supervisor/state/postgres.py)."""

    @property
    def _closing_since(self) -> float | None: ...

    def _set_connected(self, connected: bool) -> None: ...

    def _pause(self, seconds: float) -> None: ...

    def _fence(self, by: str) -> None: ...

    @property
    def fenced(self) -> bool: ...

log = logging.getLogger("arcp.store")
TRIM_STEP = 1024 * 1024  # as SQLite's: a trim frees this much below the bound (an eighth of a smaller one)
EXPIRE_EVERY = 1.0  # seconds between two looks for lost nodes
CLEAN_EVERY = 60.0  # seconds between two clean-ups of what lost nodes and forgotten sessions left
RECONNECT_FIRST = 0.1  # seconds before the first reconnection attempt, doubled after each failure ...
RECONNECT_MAX = 5.0  # ... up to this
INSERT_SQL = ("INSERT INTO jobs (job_id, principal, session_id, agent, status, created_at, created_ns, trace_id,"
              " idempotency_key, fingerprint, record, node_id) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
              " ON CONFLICT DO NOTHING RETURNING job_id")


class Lost(Exception):
    """The connection was lost during an operation: the batch is applied again once reconnected."""


@dataclass
class Settings:
    url: str
    node_id: str
    started_at: datetime
    log_bytes: int
    connect_timeout: int  # seconds one connection attempt may take
    close_timeout: float  # seconds close() waits for an unreachable database
    heartbeat: float  # seconds between two renewals of this node's heartbeat_at
    timeout: float  # a node whose heartbeat is older than this is declared lost
    window: float  # the resume window: what no session can come back for after it is cleaned up


class PgDatabase(BatchApplier):
    """The writer thread's connection to PostgreSQL, with the byte tally of each live session's
    frame log (a rolled-back transaction's changes to the tallies are undone too)."""

    def __init__(self, store: NodeStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.url = settings.url
        self.node_id = settings.node_id
        self.log_bytes = settings.log_bytes
        self.log_size: dict[str, int] = {}
        self.conn: psycopg.Connection[Any] | None = None
        self.heartbeat_due = 0.0
        self.expire_due = 0.0  # the first look for lost nodes: once connected for the node timeout
        self.clean_due = time.monotonic() + CLEAN_EVERY
        self.fenced_drops = 0  # writes dropped since this node was found declared lost
        self.connect()  # the first time, a failure is the store's failure to open

    # -- the connection ---------------------------------------------------------------
    def connect(self) -> None:
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.settings.connect_timeout)
        try:
            # A process that stops in the middle of a transaction (frozen, cut off) would hold its
            # row locks, its node row's among them, and no other node could declare it lost:
            # the server ends such a session once it has been idle in its transaction this long.
            conn.execute(f"SET idle_in_transaction_session_timeout = {max(1, int(self.settings.timeout * 1000))}")
            migrate(conn)
            row = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (self.node_id,)).fetchone()
            if not row or not row[0]:
                raise StoreError(f"node id {self.node_id!r} is in use by another live connection to the state "
                                 f"database (another supervisor, or this one's connection before it was cut): "
                                 f"each supervisor sharing a database needs a node id of its own")
            # A new process with this node id starts afresh; this process, reconnecting, stays lost
            # if it was declared lost meanwhile.
            row = conn.execute(
                "INSERT INTO nodes (node_id, started_at, heartbeat_at) VALUES (%s, %s, now())"
                " ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = now(), started_at = EXCLUDED.started_at,"
                " lost_at = CASE WHEN nodes.started_at = EXCLUDED.started_at THEN nodes.lost_at END,"
                " lost_by = CASE WHEN nodes.started_at = EXCLUDED.started_at THEN nodes.lost_by END"
                " RETURNING lost_by", (self.node_id, self.settings.started_at)).fetchone()
            if row is not None and row[0] is not None:
                self.store._fence(str(row[0]))
            if self.log_size:  # reconnected: the tallies as the database has them
                sizes: dict[str, Any] = dict(conn.execute(
                    "SELECT session_id, sum(octet_length(frame))::bigint FROM frames WHERE session_id = ANY(%s)"
                    " GROUP BY session_id", (list(self.log_size),)).fetchall())
                self.log_size = {s: int(sizes.get(s) or 0) for s in self.log_size}
            conn.autocommit = False
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        now = time.monotonic()
        self.heartbeat_due = now + self.settings.heartbeat
        self.expire_due = now + self.settings.timeout  # no judging others before the timeout has passed here

    def lost(self) -> bool:
        return self.conn is None or self.conn.closed or self.conn.broken

    def reconnect(self, cause: BaseException) -> None:
        """Connect again, waiting between attempts (up to RECONNECT_MAX); StoreError once the
        store has been closing for its close_timeout with the database still unreachable."""
        self.store._set_connected(False)
        log.warning("state store: lost the connection to the state database (%s: %s); reconnecting",
                    type(cause).__name__, cause)
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
        delay, attempts = RECONNECT_FIRST, 0
        while True:
            since = self.store._closing_since
            if since is not None and time.monotonic() - since > self.settings.close_timeout:
                raise StoreError(f"the state database was still unreachable {self.settings.close_timeout:g} s after "
                                 f"close() ({attempts} reconnection attempts; last: {cause})")
            self.store._pause(delay)
            attempts += 1
            try:
                self.connect()
            except Exception as e:
                cause = e
                if attempts == 1 or attempts % 10 == 0:
                    log.warning("state store: reconnection attempt %d failed: %s", attempts, e)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            log.warning("state store: reconnected to the state database after %d attempts", attempts)
            self.store._set_connected(True)
            return

    def close(self) -> None:
        """Say this node is gone (a heartbeat of long ago: anything it left unfinished is ended
        by the next node to look) and release its lock before the connection goes: the server
        releases a closed session's locks only once its backend has exited, a moment later, and
        another node's recover() in between would take this node for alive."""
        if self.conn is not None:
            if not self.lost():
                try:
                    self.conn.rollback()
                    self.conn.execute("UPDATE nodes SET heartbeat_at = '-infinity' WHERE node_id = %s",
                                      (self.node_id,))
                    self.conn.commit()
                    self.conn.autocommit = True
                    self.conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (self.node_id,))
                except psycopg.Error as e:
                    log.warning("state store: could not release the node's lock before closing: %s", e)
            self.conn.close()
            self.conn = None

    def idle(self) -> None:
        now = time.monotonic()
        if now < self.heartbeat_due and now < self.expire_due:
            return
        try:
            self.housekeeping()
            self.commit()
        except Exception as e:
            if self.lost():
                self.reconnect(e)
            else:
                self.rollback({})
                log.warning("state store: the node's heartbeat or its look for lost nodes failed: %s", e)

    def housekeeping(self) -> None:
        """The heartbeat when due (a node found declared lost is fenced), and the look for lost
        nodes when due; in the transaction under way."""
        assert self.conn is not None
        now = time.monotonic()
        if now >= self.heartbeat_due:
            self.heartbeat_due = now + self.settings.heartbeat
            if not cluster.renew(self.conn, self.node_id):
                row = self.conn.execute("SELECT lost_by FROM nodes WHERE node_id = %s", (self.node_id,)).fetchone()
                self.store._fence(str(row[0]) if row and row[0] else "?")
        if now >= self.expire_due:
            self.expire_due = now + min(EXPIRE_EVERY, self.settings.heartbeat)
            cluster.expire_nodes(self.conn, self.node_id, self.settings.timeout)
        if now >= self.clean_due:
            self.clean_due = now + CLEAN_EVERY
            cluster.clean_up(self.conn, self.settings.window)

    def commit(self) -> None:
        assert self.conn is not None
        self.conn.commit()

    def rollback(self, undo: Undo) -> None:
        try:
            if self.conn is not None and not self.lost():
                self.conn.rollback()
        except Exception:
            log.exception("state store: ROLLBACK failed")
        self.restore_sizes(undo)

    # -- batches ------------------------------------------------------------------------
    def _unfenced(self, ops: list[Op]) -> list[Op]:
        """Declared lost: another node has ended this one's jobs and may number its sessions
        now; nothing of this node's may be written over theirs (reads still answer)."""
        if not self.store.fenced or not any(op.kind in WRITES for op in ops):
            return ops
        dropped = sum(op.kind in WRITES for op in ops)
        self.fenced_drops += dropped
        if self.fenced_drops == dropped:
            log.error("state store: this node was declared lost: its writes are dropped from now on")
        return [op for op in ops if op.kind not in WRITES]

    def apply_batch(self, ops: list[Op]) -> int:
        ops = self._unfenced(ops)
        while True:
            undo: Undo = {}
            try:
                if self.conn is None:
                    raise Lost("not connected")
                now = time.monotonic()
                if now >= self.heartbeat_due or now >= self.expire_due:
                    self.housekeeping()  # (which may find this node declared lost: checked next)
                ops = self._unfenced(ops)
                self.apply_all(ops, undo)
                self.commit()
                return 1
            except Exception as e:
                lost = self.lost()
                self.rollback(undo)
                for op in ops:
                    op.result = None
                if lost:
                    self.reconnect(e)
                    continue  # the whole batch again
                log.warning("state store: a batch of %d operations failed (%s: %s); applying them one at a "
                            "time", len(ops), type(e).__name__, e)
                return self.apply_one_by_one(ops)

    def apply_one_by_one(self, ops: list[Op]) -> int:
        committed = 0
        for op in ops:
            if self.store.fenced and op.kind in WRITES:
                continue  # (declared lost meanwhile: see _unfenced)
            while True:
                undo: Undo = {}
                try:
                    if self.conn is None:
                        raise Lost("not connected")
                    self.apply_one(op, undo)
                    self.commit()
                    committed += 1
                except Exception as e:
                    lost = self.lost()
                    self.rollback(undo)
                    op.result = None
                    if lost:
                        self.reconnect(e)
                        continue
                    op.error = e if isinstance(e, StoreError) else StoreError(
                        f"{describe(op.kind, op.args)}: {type(e).__name__}: {e}")
                break
        return committed

    def apply(self, op: Op, undo: Undo) -> Any:
        assert self.conn is not None
        conn = self.conn
        k, a = op.kind, op.args
        if k == INSERT:
            held = self.insert(k, a)
            if held is not None:
                raise StoreError(f"{describe(k, a)}: its idempotency key is held by job {held.job_id}")
        elif k == CLAIM:
            return self.insert(k, a)
        elif k == FINISH:  # (not over a terminal another node gave it: this node was declared lost)
            conn.execute("UPDATE jobs SET status = %s, terminal = %s, record = %s, finished_ns = %s WHERE job_id = %s"
                         " AND NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = jobs.node_id"
                         " AND n.lost_at IS NOT NULL)", a)
        elif k == DELETE:
            self.delete_jobs(a[0], undo)
        elif k == FORGET:
            session_id = a[0]
            self.set_size(session_id, None, undo)
            conn.execute("DELETE FROM frames f WHERE f.session_id = %s AND NOT EXISTS "
                         "(SELECT 1 FROM jobs j WHERE j.job_id = f.job_id AND j.session_id = %s)",
                         (session_id, session_id))
        elif k == CREDS:
            job_id, credential_ids = a
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO credentials (credential_id, job_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                                [(c, job_id) for c in credential_ids])
        elif k == REVOKED:
            credential_id, revoked = a
            if revoked:
                conn.execute("DELETE FROM credentials WHERE credential_id = %s", (credential_id,))
            else:
                conn.execute("UPDATE credentials SET attempts = attempts + 1 WHERE credential_id = %s",
                             (credential_id,))
        elif k == RECOVER:
            return self.recover(a[0], a[1], undo)
        elif k == TERMINAL:
            row = conn.execute("SELECT terminal FROM jobs WHERE job_id = %s", a).fetchone()
            return orjson.loads(row[0]) if row and row[0] is not None else None
        elif k == SINCE:
            return [(s, bytes(f)) for s, f in conn.execute(
                "SELECT seq, frame FROM frames WHERE session_id = %s AND seq > %s ORDER BY seq", a)]
        elif k == OLDEST:
            row = conn.execute("SELECT min(seq) FROM frames WHERE session_id = %s", a).fetchone()
            return row[0] if row else None
        elif k == JOB_FRAMES:
            session_id, job_id, after_seq = a
            return [bytes(r[0]) for r in conn.execute(
                "SELECT frame FROM frames WHERE job_id = %s AND session_id = %s AND seq > %s ORDER BY seq",
                (job_id, session_id, after_seq))]
        elif k == UNREVOKED:
            query = "SELECT c.credential_id FROM credentials c"
            if a[0]:
                query += " JOIN jobs j ON j.job_id = c.job_id WHERE j.finished_ns IS NOT NULL"
                if a[1]:
                    query += f" AND j.finished_ns < {int(a[1])}"
            return [r[0] for r in conn.execute(query)]
        elif k in CLUSTER_KINDS:
            return cluster.apply(conn, self.node_id, self.settings.timeout, k, a, self.settings.heartbeat)
        else:
            raise AssertionError(f"unknown operation {k!r}")
        return None

    def insert(self, kind: str, a: tuple[Any, ...]) -> StoredJob | None:
        """Insert a job; None once it is stored (by this call, or by this very operation before a
        lost COMMIT), the job holding its idempotency key if another does; StoreError if a
        different job has its id."""
        assert self.conn is not None
        conn = self.conn
        if conn.execute(INSERT_SQL, (*a, self.node_id)).fetchone() is not None:
            return None
        job_id, principal, created_ns, key = a[0], a[1], a[6], a[8]
        row = conn.execute("SELECT node_id, created_ns FROM jobs WHERE job_id = %s", (job_id,)).fetchone()
        if row is not None:
            if tuple(row) == (self.node_id, created_ns):
                return None  # this very insert, committed before the connection was lost
            raise StoreError(f"{describe(kind, a)}: a job with this id exists already")
        if key is not None:
            held = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE principal = %s AND idempotency_key = %s",
                                (principal, key)).fetchone()
            if held is not None:
                return stored_job(held)
        raise StoreError(f"{describe(kind, a)}: not inserted, and no job holds its id or key")

    def set_size(self, session_id: str, size: int | None, undo: Undo) -> None:
        if session_id not in undo:
            undo[session_id] = self.log_size.get(session_id)
        if size is None:
            self.log_size.pop(session_id, None)
        else:
            self.log_size[session_id] = size

    def log_frames(self, rows: list[tuple[Any, ...]], undo: Undo) -> None:
        assert self.conn is not None
        grown: dict[str, tuple[int, int]] = {}  # session -> (bytes added, newest seq)
        for session_id, seq, _, data in rows:
            added, newest = grown.get(session_id, (0, 0))
            grown[session_id] = (added + len(data), max(newest, seq))
        with self.conn.cursor() as cur:
            cur.executemany("INSERT INTO frames (session_id, seq, job_id, frame) VALUES (%s, %s, %s, %s)"
                            " ON CONFLICT (session_id, seq) DO UPDATE SET job_id = EXCLUDED.job_id,"
                            " frame = EXCLUDED.frame", rows)
        for session_id, (added, newest) in grown.items():
            size = self.log_size.get(session_id, 0) + added
            if size > self.log_bytes:
                size = self.trim(session_id, newest)
            self.set_size(session_id, size, undo)

    def trim(self, session_id: str, newest: int) -> int:
        """Delete a session's oldest frames until its log is below the trim target (never its
        newest frame, which fits the bound alone); return the bytes left, as the database has them."""
        assert self.conn is not None
        conn = self.conn
        row = conn.execute("SELECT coalesce(sum(octet_length(frame)), 0)::bigint FROM frames WHERE session_id = %s",
                           (session_id,)).fetchone()
        size = int(row[0]) if row else 0
        if size <= self.log_bytes:
            return size
        target = self.log_bytes - min(self.log_bytes // 8, TRIM_STEP)
        row = conn.execute(
            "WITH d AS (DELETE FROM frames WHERE session_id = %(s)s AND seq < %(newest)s AND seq <= coalesce("
            "  (SELECT seq FROM (SELECT seq, sum(octet_length(frame)) OVER (ORDER BY seq) AS upto FROM frames"
            "    WHERE session_id = %(s)s AND seq < %(newest)s) t WHERE upto >= %(excess)s ORDER BY seq LIMIT 1),"
            "  %(newest)s) RETURNING octet_length(frame) AS n)"
            " SELECT coalesce(sum(n), 0)::bigint FROM d",
            {"s": session_id, "newest": newest, "excess": size - target}).fetchone()
        return size - (int(row[0]) if row else 0)

    def delete_jobs(self, job_ids: list[str], undo: Undo) -> None:
        assert self.conn is not None
        conn = self.conn
        if not job_ids:
            return
        for session_id, n in conn.execute(
                "SELECT session_id, sum(octet_length(frame))::bigint FROM frames WHERE job_id = ANY(%s)"
                " GROUP BY session_id", (job_ids,)).fetchall():
            if session_id in self.log_size:
                self.set_size(session_id, max(0, self.log_size[session_id] - int(n or 0)), undo)
        conn.execute("DELETE FROM frames WHERE job_id = ANY(%s)", (job_ids,))
        conn.execute("DELETE FROM jobs WHERE job_id = ANY(%s)", (job_ids,))

    def recover(self, retention_jobs: int, retention_seconds: int, undo: Undo) -> tuple[list[StoredJob], int]:
        """End the running jobs of this node (a process before this one with its id) and of dead
        nodes (their advisory lock free, and their heartbeat older than the node timeout or
        given up at a close: lost, their jobs' terminals relayed to their sessions), then
        retention over every node's finished jobs; return the finished jobs kept (a live node's
        running jobs are its own, neither ended nor returned)."""
        assert self.conn is not None
        conn = self.conn
        now = time.time_ns()
        dead = [r[0] for r in conn.execute(
            "SELECT node_id FROM nodes WHERE node_id <> %s AND lost_at IS NULL"
            " AND heartbeat_at < now() - make_interval(secs => %s)"
            " AND pg_try_advisory_xact_lock(hashtextextended(node_id, 0)) FOR UPDATE SKIP LOCKED",
            (self.node_id, self.settings.timeout))]
        term = orjson.dumps(interrupted_terminal(now))
        interrupted = conn.execute(
            "UPDATE jobs SET status = 'error', terminal = %s, finished_ns = %s"
            " WHERE finished_ns IS NULL AND node_id = %s RETURNING job_id", (term, now, self.node_id)).fetchall()
        ended = sum(cluster.end_jobs_of(conn, node, self.node_id) for node in dead)
        old = conn.execute("SELECT job_id FROM jobs WHERE finished_ns < %s",
                           (now - retention_seconds * 1_000_000_000,)).fetchall()
        self.delete_jobs([j for (j,) in old], undo)
        excess = conn.execute("SELECT job_id FROM jobs WHERE finished_ns IS NOT NULL ORDER BY finished_ns DESC"
                              " OFFSET %s", (retention_jobs,)).fetchall()
        self.delete_jobs([j for (j,) in excess], undo)
        rows = conn.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE finished_ns IS NOT NULL ORDER BY created_ns")
        return [stored_job(r) for r in rows], len(interrupted) + ended
