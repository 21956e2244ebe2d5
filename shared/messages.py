"""ARCP v1.1 message vocabulary: client request types, features, statuses, agent grammar."""

from __future__ import annotations

import re

# Client -> server request types (protocol.md §3.1).
SESSION_HELLO = "session.hello"
SESSION_PING = "session.ping"
SESSION_PONG = "session.pong"
SESSION_ACK = "session.ack"
SESSION_LIST_JOBS = "session.list_jobs"
SESSION_CLOSE = "session.close"
SESSION_BYE = "session.bye"
JOB_SUBMIT = "job.submit"
JOB_CANCEL = "job.cancel"
JOB_SUBSCRIBE = "job.subscribe"
JOB_UNSUBSCRIBE = "job.unsubscribe"

CLIENT_TYPES = frozenset({
    SESSION_HELLO, SESSION_PING, SESSION_PONG, SESSION_ACK, SESSION_LIST_JOBS, SESSION_CLOSE,
    SESSION_BYE, JOB_SUBMIT, JOB_CANCEL, JOB_SUBSCRIBE, JOB_UNSUBSCRIBE,
})

FEATURES: tuple[str, ...] = (
    "heartbeat", "ack", "list_jobs", "subscribe", "lease_expires_at", "cost.budget",
    "progress", "result_chunk", "agent_versions",
)

LOG_LEVELS = frozenset({"debug", "info", "warn", "error"})
QUEUED = "queued"  # the status phase of a job waiting to start (the supervisor's own)
RESERVED_PHASES = frozenset({"credential_rotated", "back_pressure", QUEUED})

# Job statuses (protocol.md §6.4).
PENDING, RUNNING = "pending", "running"
SUCCESS, ERROR, CANCELLED, TIMED_OUT = "success", "error", "cancelled", "timed_out"
TERMINAL_STATUSES = frozenset({SUCCESS, ERROR, CANCELLED, TIMED_OUT})

# Agent references (protocol.md §6.2): the spec/Go grammar or the Python client's.
_GO_NAME = r"[a-z0-9][a-z0-9._-]*"
_PY_NAME = r"[a-zA-Z][a-zA-Z0-9._-]*"
_GO_VERSION = r"[a-zA-Z0-9.+_-]+"
_PY_VERSION = r"[a-zA-Z0-9][a-zA-Z0-9._-]*"
AGENT_NAME_RE = re.compile(rf"^(?:{_GO_NAME}|{_PY_NAME})$")
AGENT_VERSION_RE = re.compile(rf"^(?:{_GO_VERSION}|{_PY_VERSION})$")
MAX_AGENT_REF = 256


def split_agent_ref(ref: str) -> tuple[str, str | None]:
    """`name` or `name@version` -> (name, version|None); ValueError naming the problem."""
    if not ref:
        raise ValueError("agent must be a non-empty string")
    if len(ref) > MAX_AGENT_REF:
        raise ValueError(f"agent reference longer than {MAX_AGENT_REF} characters")
    name, sep, version = ref.partition("@")
    if not AGENT_NAME_RE.fullmatch(name):
        raise ValueError(f"agent name {name!r} does not match [a-z0-9][a-z0-9._-]*")
    if sep:
        if not AGENT_VERSION_RE.fullmatch(version):
            raise ValueError(f"agent version {version!r} does not match [a-zA-Z0-9.+_-]+")
        return name, version
    return name, None
