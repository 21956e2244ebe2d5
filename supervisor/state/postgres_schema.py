"""The PostgreSQL store's schema (supervisor/state/postgres.py) and its migrations.

`schema_version` has one row per migration applied (its number and when). At open the store
takes a transaction-scoped advisory lock (so that supervisors opening one database at once
migrate it once), creates `schema_version` if absent, refuses a database whose version is newer
than SCHEMA_VERSION (a newer supervisor migrated it: this one would misread it), and applies
the migrations it lacks, in one transaction.

Version 1, made for several supervisor processes ("nodes") sharing the database:
  nodes        node_id, started_at, heartbeat_at: each store's process, its heartbeat renewed
               every node heartbeat (--node-heartbeat). A live node also holds a session-level advisory lock
               keyed on its node_id (hashtextextended(node_id, 0)) for as long as its connection lives, which
               is how another node's recover() tells a dead node (lock free) from a live one.
  jobs         as in SQLite, plus node_id (the process running the job); the unique index
               (principal, idempotency_key) for jobs with a key holds across nodes.
  frames       (session_id, seq) -> job_id, frame: each session's sequenced frame log.
  credentials  credential_id -> job_id, revoked, attempts.
Version 2, for sessions and jobs served by several nodes (supervisor/cluster/):
  nodes        + lost_at, lost_by: set once another node has declared this one lost (its heartbeat
               older than the node timeout); a node that finds it set stops (it is fenced).
  sessions     session_id -> node_id (the node that numbers its frames now), principal, the
               SHA-256 of its resume token, its last seq when it was handed over or detached,
               detached_at (NULL while a transport is attached), closed, flavour.
  relay        frames for a session numbered by another node (id order): a job's frames when its
               session has moved, frames for a remote subscriber, a lost node's jobs' terminals.
               kind 'frame' (an envelope without event_seq) or 'terminal' (a job's outcome, the
               frame built by the session's node for its client's flavour).
  commands     commands to a node (a cancel, a subscribe, a handover and its answer), in id order,
               read and deleted by that node.
  follows      (job_id, session_id): sessions subscribed to a running job, so that a lost node's
               job's terminal reaches them too.
Records and terminal outcomes are stored as the JSON bytes the store serialised (bytea, as in
SQLite): the store never queries inside them, and jsonb would refuse a \\u0000 in a string.
"""

from __future__ import annotations

from typing import Any

from supervisor.state.base import StoreError

SCHEMA_VERSION = 2
MIGRATION_LOCK = 0x61726370  # "arcp": the advisory lock held while the schema is checked and migrated

MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    started_at TIMESTAMPTZ NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    session_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_ns BIGINT NOT NULL,
    finished_ns BIGINT,
    trace_id TEXT NOT NULL,
    idempotency_key TEXT,
    fingerprint BYTEA,
    record BYTEA NOT NULL,
    terminal BYTEA
);
CREATE UNIQUE INDEX jobs_idem ON jobs (principal, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (finished_ns) WHERE finished_ns IS NOT NULL;
CREATE INDEX jobs_running ON jobs (node_id) WHERE finished_ns IS NULL;
CREATE INDEX jobs_session ON jobs (session_id);
CREATE TABLE frames (
    session_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    job_id TEXT NOT NULL,
    frame BYTEA NOT NULL,
    PRIMARY KEY (session_id, seq)
);
CREATE INDEX frames_job ON frames (job_id, seq);
CREATE TABLE credentials (
    credential_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    revoked BOOLEAN NOT NULL DEFAULT FALSE,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX credentials_job ON credentials (job_id);
""",
    2: """
ALTER TABLE nodes ADD COLUMN lost_at TIMESTAMPTZ, ADD COLUMN lost_by TEXT;
CREATE TABLE sessions (
    session_id TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    principal TEXT NOT NULL,
    token_hash BYTEA NOT NULL,
    seq BIGINT NOT NULL DEFAULT 0,
    detached_at TIMESTAMPTZ,
    closed BOOLEAN NOT NULL DEFAULT FALSE,
    flavour TEXT NOT NULL
);
CREATE INDEX sessions_node ON sessions (node_id);
CREATE TABLE relay (
    id BIGSERIAL PRIMARY KEY,
    session_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    body BYTEA NOT NULL,
    logged BOOLEAN NOT NULL DEFAULT TRUE,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX relay_session ON relay (session_id, id);
CREATE TABLE commands (
    id BIGSERIAL PRIMARY KEY,
    to_node TEXT NOT NULL,
    body BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX commands_to ON commands (to_node, id);
CREATE TABLE follows (
    job_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    PRIMARY KEY (job_id, session_id)
);
""",
}


def too_new(found: int) -> StoreError:
    return StoreError(f"the state database's schema is version {found}, newer than version {SCHEMA_VERSION}, "
                      f"the newest this supervisor knows: a newer supervisor has migrated it; run that one "
                      f"(or a database of this version's own)")


def migrate(conn: Any) -> int:
    """Create or migrate the schema on `conn` (a psycopg connection, not in a transaction) in one
    transaction; return the version found before. StoreError if the database is newer."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                     " version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = row[0] if row and row[0] is not None else 0
        if found > SCHEMA_VERSION:
            raise too_new(found)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            conn.execute(MIGRATIONS[version])
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return int(found)
