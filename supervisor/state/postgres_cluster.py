"""The SQL of what several supervisor processes ("nodes") sharing one PostgreSQL database do
together (supervisor/cluster/ on the event loop's side), run on the store's writer thread like
every other operation (supervisor/state/postgres_ops.py), in its queue's order.

Sessions: each has a row naming the node that numbers its frames now (where its client is, or was
last), the SHA-256 of its resume token, and its seq when it was detached or handed over, so that
another node can take it over on a resume.

Relay: frames for a session that another node numbers, in id order: kind 'frame' (an envelope
without its event_seq; `logged` false for what is never replayed) or 'terminal' (a job's outcome
as JSON; the session's node builds the frame for its client's flavour). Each insert is announced
by NOTIFY on RELAY_CHANNEL with the session id; a node that misses one (a reconnection) reads the
relay rows of all its sessions again.

Commands between nodes are rows of `commands` (JSON, to one node), announced by NOTIFY on
COMMAND_CHANNEL with the node's id; that node reads and deletes its rows in id order, and reads
them again after a reconnection, so that no command is lost with an announcement. They are queued
like writes, so one ordered after a write is sent only once that write is committed.

Liveness: a node renews nodes.heartbeat_at every heartbeat; another node, connected itself for
at least the node timeout, declares a node whose heartbeat is older than the timeout lost (a
row lock, FOR UPDATE SKIP LOCKED, decides which node acts): lost_at is set, its unfinished jobs
end INTERNAL_ERROR (retryable, details {"reason": "node lost", "node": ID}) and their terminals
go to their sessions by relay, in that one transaction. A node whose row says lost is fenced:
its heartbeat finds no row to renew, and it stops.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import orjson
import psycopg

from shared.ids import format_ts
from supervisor.state.ops import (
    COMMAND, COMMANDS_TAKE, FOLLOW, JOB_COLUMNS, JOB_GET, JOBS_OF, NODE_GONE, RELAY, RELAY_TAKE, RUNNING, SESSION_DROP, SESSION_GET, SESSION_PUT, SESSION_TAKE,
    stored_job,
)

log = logging.getLogger("arcp.store")
RELAY_CHANNEL = "arcp_relay"
COMMAND_CHANNEL = "arcp_command"
NODE_LOST = "node lost"


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def lost_terminal(node_id: str, now_ns: int) -> dict[str, Any]:
    return {"status": "error", "value": None, "result_id": None, "result_size": None,
            "completed_at": format_ts(now_ns / 1e9),
            "error": {"code": "INTERNAL_ERROR", "retryable": True,
                      "message": f"the supervisor process running the job ({node_id}) was lost",
                      "details": {"reason": NODE_LOST, "node": node_id}}}


def apply(conn: psycopg.Connection[Any], node_id: str, timeout: float, kind: str, a: tuple[Any, ...],
          heartbeat: float = 2.0) -> Any:
    if kind == NODE_GONE:
        return node_gone(conn, a[0], node_id, heartbeat)
    if kind == SESSION_PUT:
        session_id, node, principal, digest, seq, detached, closed, flavour = a
        conn.execute(
            "INSERT INTO sessions (session_id, node_id, principal, token_hash, seq, detached_at, closed, flavour)"
            " VALUES (%s, %s, %s, %s, %s, CASE WHEN %s THEN now() END, %s, %s)"
            " ON CONFLICT (session_id) DO UPDATE SET node_id = EXCLUDED.node_id, token_hash = EXCLUDED.token_hash,"
            " seq = greatest(sessions.seq, EXCLUDED.seq), detached_at = EXCLUDED.detached_at,"
            " closed = EXCLUDED.closed, flavour = EXCLUDED.flavour"
            " WHERE sessions.node_id = %s",  # (only the node numbering it says where it goes)
            (session_id, node, principal, digest, seq, detached, closed, flavour, node_id))
    elif kind == SESSION_DROP:
        conn.execute("DELETE FROM sessions WHERE session_id = %s AND node_id = %s", (a[0], node_id))
        conn.execute("DELETE FROM relay WHERE session_id = %s", (a[0],))
    elif kind == RELAY:
        session_id, job_id, rkind, body, logged = a
        conn.execute("INSERT INTO relay (session_id, job_id, kind, body, logged) VALUES (%s, %s, %s, %s, %s)",
                     (session_id, job_id, rkind, body, logged))
        conn.execute("SELECT pg_notify(%s, %s)", (RELAY_CHANNEL, session_id))
    elif kind == RUNNING:
        conn.execute("UPDATE jobs SET status = 'running' WHERE job_id = %s AND finished_ns IS NULL", (a[0],))
    elif kind == COMMAND:
        to, body = a
        conn.execute("INSERT INTO commands (to_node, body) VALUES (%s, %s)", (to, body))
        conn.execute("SELECT pg_notify(%s, %s)", (COMMAND_CHANNEL, to))
    elif kind == COMMANDS_TAKE:
        return [bytes(r[0]) for r in conn.execute(
            "WITH d AS (DELETE FROM commands WHERE id IN (SELECT id FROM commands WHERE to_node = %s ORDER BY id"
            " LIMIT 256) RETURNING id, body) SELECT body FROM d ORDER BY id", (node_id,))]
    elif kind == SESSION_GET:
        return session_row(conn, a[0], timeout)
    elif kind == SESSION_TAKE:
        session_id, from_node = a
        row = conn.execute("UPDATE sessions SET node_id = %s WHERE session_id = %s AND node_id = %s"
                           " RETURNING session_id", (node_id, session_id, from_node)).fetchone()
        return row is not None
    elif kind == RELAY_TAKE:
        return [(r[0], r[1], bytes(r[2]), r[3]) for r in conn.execute(
            "WITH d AS (DELETE FROM relay WHERE id IN (SELECT id FROM relay WHERE session_id = %s ORDER BY id"
            " LIMIT %s) RETURNING id, job_id, kind, body, logged)"
            " SELECT job_id, kind, body, logged FROM d ORDER BY id", (a[0], a[1]))]
    elif kind == FOLLOW:
        job_id, session_id, follows = a
        if follows:
            conn.execute("INSERT INTO follows (job_id, session_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (job_id, session_id))
        else:
            conn.execute("DELETE FROM follows WHERE job_id = %s AND session_id = %s", (job_id, session_id))
    elif kind == JOB_GET:
        row = conn.execute(f"SELECT {JOB_COLUMNS}, node_id FROM jobs WHERE job_id = %s", (a[0],)).fetchone()
        return None if row is None else (stored_job(row[:-1]), row[-1])
    elif kind == JOBS_OF:
        principal = a[0]
        rows = conn.execute(f"SELECT {JOB_COLUMNS}, node_id FROM jobs"
                            + (" WHERE principal = %s" if principal is not None else "") + " ORDER BY created_ns",
                            (principal,) if principal is not None else ())
        return [(stored_job(r[:-1]), r[-1]) for r in rows]
    else:
        raise AssertionError(f"unknown cluster operation {kind!r}")
    return None


def session_row(conn: psycopg.Connection[Any], session_id: str, timeout: float) -> dict[str, Any] | None:
    """A session's row, with whether its node is alive and the newest seq logged for it."""
    row = conn.execute(
        "SELECT s.node_id, s.principal, s.token_hash, s.seq, extract(epoch FROM now() - s.detached_at),"
        " s.closed, s.flavour, n.lost_at IS NULL AND n.heartbeat_at >= now() - make_interval(secs => %s),"
        " (SELECT max(seq) FROM frames f WHERE f.session_id = s.session_id),"
        " EXISTS (SELECT 1 FROM jobs j WHERE j.session_id = s.session_id AND j.finished_ns IS NULL)"
        " FROM sessions s LEFT JOIN nodes n ON n.node_id = s.node_id WHERE s.session_id = %s",
        (timeout, session_id)).fetchone()
    if row is None:
        return None
    return {"node_id": row[0], "principal": row[1], "token_hash": bytes(row[2]), "seq": int(row[3]),
            "detached_for": None if row[4] is None else float(row[4]), "closed": row[5], "flavour": row[6],
            "node_alive": bool(row[7]), "logged_seq": int(row[8] or 0), "running_jobs": bool(row[9])}


def expire_nodes(conn: psycopg.Connection[Any], node_id: str, timeout: float) -> list[str]:
    """Declare lost every other node whose heartbeat is older than `timeout` that no other node
    is declaring now; end their unfinished jobs and relay the terminals to the jobs' sessions.
    The node ids declared lost."""
    lost = conn.execute(
        "SELECT node_id, heartbeat_at = '-infinity' FROM nodes WHERE node_id <> %s AND lost_at IS NULL"
        " AND heartbeat_at < now() - make_interval(secs => %s) FOR UPDATE SKIP LOCKED", (node_id, timeout)).fetchall()
    for dead, closed in lost:
        end_jobs_of(conn, dead, node_id, closed=closed)
    return [dead for dead, _ in lost]


def end_jobs_of(conn: psycopg.Connection[Any], dead: str, by: str, *, closed: bool = False) -> int:
    """Mark `dead` lost, end its unfinished jobs and relay their terminals; how many ended.
    `closed`: it closed its store (a stop), leaving these behind."""
    now = time.time_ns()
    term = lost_terminal(dead, now)
    conn.execute("UPDATE nodes SET lost_at = now(), lost_by = %s WHERE node_id = %s", (by, dead))
    ended = conn.execute("UPDATE jobs SET status = 'error', terminal = %s, finished_ns = %s"
                         " WHERE node_id = %s AND finished_ns IS NULL RETURNING job_id, session_id, trace_id",
                         (orjson.dumps(term), now, dead)).fetchall()
    # to each job's session, and to the sessions following it (they get it wherever they resume)
    to = [(s, j, t) for j, s, t in ended]
    if ended:
        traces = {j: t for j, _, t in ended}
        to += [(s, j, traces[j]) for j, s in conn.execute(
            "SELECT job_id, session_id FROM follows WHERE job_id = ANY(%s)", (list(traces),))]
    sessions = sorted({s for s, _, _ in to})
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO relay (session_id, job_id, kind, body, logged) VALUES (%s, %s, 'terminal', %s, TRUE)",
                        [(s, j, orjson.dumps({"trace_id": t, "terminal": term})) for s, j, t in to])
        cur.executemany("SELECT pg_notify(%s, %s)", [(RELAY_CHANNEL, s) for s in sessions])
    if closed and not ended:
        log.info("node %s has stopped", dead)
    else:
        log.warning("node %s declared lost (%s): %d unfinished jobs ended", dead,
                    "it stopped before they did" if closed else "no heartbeat for more than the node timeout",
                    len(ended))
    return len(ended)


def node_gone(conn: psycopg.Connection[Any], node: str, by: str, heartbeat: float) -> bool:
    """Whether `node` is lost: declared so already, or declared now because its connection is
    gone (its advisory lock is free: a process killed, its socket closed) and it has missed two
    heartbeats (not a reconnection under way). Sooner than its heartbeat's timeout, for a resume
    that waits on it."""
    row = conn.execute(
        "SELECT lost_at IS NOT NULL, heartbeat_at < now() - make_interval(secs => %s) FROM nodes"
        " WHERE node_id = %s FOR UPDATE SKIP LOCKED", (2 * heartbeat, node)).fetchone()
    if row is None:  # no such node, or its row is locked (by its own transaction, or a declaration)
        return conn.execute("SELECT NOT EXISTS (SELECT 1 FROM nodes WHERE node_id = %s AND lost_at IS NULL)",
                            (node,)).fetchone() == (True,)
    if row[0]:
        return True
    if not row[1]:
        return False
    free = conn.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", (node,)).fetchone()
    if not free or not free[0]:
        return False
    end_jobs_of(conn, node, by)
    return True


def clean_up(conn: psycopg.Connection[Any], window: float) -> None:
    """What no node will read any more: the sessions of nodes lost longer ago than the resume
    window (never resumed), relay rows and follows of sessions that have no row (forgotten) once
    older than the window, commands to lost nodes or older than the window, follows of finished
    jobs."""
    conn.execute("DELETE FROM sessions s USING nodes n WHERE n.node_id = s.node_id"
                 " AND n.lost_at < now() - make_interval(secs => %s)", (window,))
    conn.execute("DELETE FROM relay r WHERE r.created_at < now() - make_interval(secs => %s)"
                 " AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = r.session_id)", (window,))
    conn.execute("DELETE FROM commands c WHERE c.created_at < now() - make_interval(secs => %s)"
                 " OR EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = c.to_node AND n.lost_at IS NOT NULL)",
                 (window,))
    conn.execute("DELETE FROM follows f WHERE NOT EXISTS (SELECT 1 FROM sessions s WHERE s.session_id = f.session_id)"
                 " OR EXISTS (SELECT 1 FROM jobs j WHERE j.job_id = f.job_id AND j.finished_ns IS NOT NULL)")


def renew(conn: psycopg.Connection[Any], node_id: str) -> bool:
    """This node's heartbeat; False if another node has declared it lost (it must stop)."""
    row = conn.execute("UPDATE nodes SET heartbeat_at = now() WHERE node_id = %s AND lost_at IS NULL"
                       " RETURNING node_id", (node_id,)).fetchone()
    return row is not None
