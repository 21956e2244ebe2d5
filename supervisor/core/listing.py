"""session.list_jobs: filters, paging and the entries, over the job table; no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import orjson

from shared.envelope import Envelope, frame
from shared.errors import InvalidRequest
from shared.ids import new_ulid, parse_ts
from supervisor.core.jobs import Job
from supervisor.core.limits import LIMITS_KEY
from supervisor.core.session import Session
from supervisor.core.usage import USAGE_KEY

LIST_MAX = 1000


def list_jobs(jobs: Iterable[Job], session: Session, env: Envelope,
              usage_of: Callable[[Job], dict[str, Any] | None]) -> dict[str, Any]:
    """The session.jobs answer to a session.list_jobs: the jobs the session may see (its
    principal's; every one for an admin), filtered, one page that fits one frame."""
    p = env.payload
    flt = p.get("filter") or {}
    if not isinstance(flt, dict):
        raise InvalidRequest("session.list_jobs field 'filter' must be an object")
    statuses = flt.get("status")
    if isinstance(statuses, str):
        statuses = [statuses]
    if statuses is not None and (not isinstance(statuses, list)
                                 or not all(isinstance(x, str) for x in statuses)):
        raise InvalidRequest("session.list_jobs filter 'status' must be a list of strings")
    agent = flt.get("agent")
    if agent is not None and not isinstance(agent, str):
        raise InvalidRequest("session.list_jobs filter 'agent' must be a string")
    after = before = None
    try:
        if flt.get("created_after") is not None:
            after = parse_ts(flt["created_after"]).timestamp()
        if flt.get("created_before") is not None:
            before = parse_ts(flt["created_before"]).timestamp()
    except ValueError as e:
        raise InvalidRequest(f"session.list_jobs filter: bad timestamp: {e}") from e
    limit = p.get("limit") or LIST_MAX
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidRequest("session.list_jobs field 'limit' must be a non-negative integer")
    limit = min(limit, LIST_MAX)
    cursor = p.get("cursor")
    start = 0
    if cursor is not None:
        if not isinstance(cursor, str) or not cursor.startswith("o:") or not cursor[2:].isdigit():
            raise InvalidRequest("session.list_jobs field 'cursor' is not a cursor this server issued")
        start = int(cursor[2:])
    rows = []
    for job in jobs:
        if job.principal != session.principal and not session.admin:
            continue
        if statuses is not None and job.status not in statuses:
            continue
        if agent is not None and agent != job.agent_ref and (
                "@" in agent or job.agent_ref.split("@")[0] != agent):
            continue
        if after is not None or before is not None:
            created = parse_ts(job.created_at).timestamp()
            if (after is not None and created < after) or (before is not None and created > before):
                continue
        rows.append(job)
    out: list[dict[str, Any]] = []
    size = 256
    end = start
    for job in rows[start:start + limit]:
        entry = {"job_id": job.id, "agent": job.agent_ref, "status": job.status, "lease": job.lease,
                 "created_at": job.created_at, "submitted_at": job.created_at, "trace_id": job.trace_id,
                 "last_event_seq": job.last_seq}
        if job.parent_job_id:
            entry["parent_job_id"] = job.parent_job_id
        if session.admin:
            entry["principal"] = job.principal
        if LIMITS_KEY in job.accepted:  # the effective limits, as job.accepted echoed them
            entry[LIMITS_KEY] = job.accepted[LIMITS_KEY]
        usage = usage_of(job)
        if usage is not None:
            entry[USAGE_KEY] = usage
        size += len(orjson.dumps(entry)) + 1
        if size > session.frame_cap and out:
            break  # a page must fit one frame: the rest goes to the next page
        out.append(entry)
        end += 1
    payload: dict[str, Any] = {"request_id": env.id, "jobs": out}
    if end < len(rows):
        payload["next_cursor"] = f"o:{end}"
    return frame("session.jobs", new_ulid(), payload, session_id=session.id)
