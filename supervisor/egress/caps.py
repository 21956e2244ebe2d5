"""How many connections the egress proxy holds open at once, in all and per job.

Every proxy connection costs the supervisor descriptors (the job's socket, the
origin's, and a splice pipe per relay thread), so the proxy's share of
RLIMIT_NOFILE is capped, and so is each job's share of that. A connection past
either cap is answered 429 at once, before any task is started for it, and the
job hears of it in one `warn` event per cap.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import time
from collections.abc import Sized
from dataclasses import dataclass
from typing import Protocol

from supervisor import metrics
from supervisor.egress.messages import MAX_HEAD, error_response

log = logging.getLogger("arcp.egress")

MAX_PER_JOB = 128  # open proxy connections per job, whatever the descriptor limit
FDS_PER_CONNECTION = 6  # the job's socket, the origin's, and a splice pipe (2) per relay thread (2 for a tunnel)
EGRESS_SHARE = 2  # the proxy may hold 1/EGRESS_SHARE of the supervisor's descriptors
JOB_SHARE = 8  # and one job at most 1/JOB_SHARE of the proxy's connections
CAP_WARN_INTERVAL = 10.0  # seconds between supervisor log lines about the global cap


class CappedJob(Protocol):
    """What the caps need of a job's side of the proxy (`proxy.EgressJob`)."""

    @property
    def exchanges(self) -> Sized: ...  # the job's connections that hold a slot

    def over_cap(self, which: str, message: str) -> None: ...


@dataclass
class ConnectionCaps:
    """How many proxy connections may be open at once, in all and per job, from the
    supervisor's RLIMIT_NOFILE soft limit (read once, when the first job with `net.fetch`
    starts: after `raise_open_files_limit`).

    Each connection may hold FDS_PER_CONNECTION descriptors at its peak (a tunnel: two
    sockets and two relay threads with a pipe each). Sessions, worker pipes and pidfds,
    cgroup files, the store and every worker's egress listener need the rest, so the proxy
    gets half the limit: total = limit // 12. A job gets at most an eighth of that (so at
    least eight jobs at their cap fit at once) and never more than 128: per_job =
    min(128, total // 8), at least 1. At the usual hard limit (2^20) that is 87381 and
    128; at 1024, 85 and 10. Beyond either cap a connection is answered 429 at once, so the
    supervisor never runs out of descriptors because of the proxy."""

    nofile: int
    total: int
    per_job: int
    open: int = 0  # proxy connections open now, across all jobs

    @classmethod
    def for_limit(cls, nofile: int) -> ConnectionCaps:
        total = max(1, nofile // (EGRESS_SHARE * FDS_PER_CONNECTION))
        return cls(nofile, total, max(1, min(MAX_PER_JOB, total // JOB_SHARE)))

    @classmethod
    def from_rlimit(cls) -> ConnectionCaps:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft > 1 << 30:
            soft = 1 << 30
        return cls.for_limit(soft)


_caps: ConnectionCaps | None = None
_cap_warned = 0.0


def connection_caps() -> ConnectionCaps:
    global _caps
    if _caps is None:
        _caps = ConnectionCaps.from_rlimit()
        log.info("egress proxy: at most %d connections at once, %d per job (RLIMIT_NOFILE %d)",
                 _caps.total, _caps.per_job, _caps.nofile)
    return _caps


def refused_over_cap(job: CappedJob, conn: socket.socket) -> bool:
    """Answer 429 on `conn` (non-blocking) when the job or the whole proxy is at its cap;
    False when the connection may be served. The caller closes a refused one."""
    global _cap_warned
    caps = connection_caps()
    if len(job.exchanges) >= caps.per_job:
        text = f"more than {caps.per_job} open connections for this job"
        job.over_cap("job", f"egress: connections over {caps.per_job} at once are refused (429)")
    elif caps.open >= caps.total:
        text = f"all {caps.total} connections of the supervisor's egress proxy are in use"
        job.over_cap("total", f"egress: refused (429): {text}")
        now = time.monotonic()
        if now - _cap_warned > CAP_WARN_INTERVAL:
            _cap_warned = now
            log.warning("egress proxy: %s (RLIMIT_NOFILE %d); refusing with 429", text, caps.nofile)
    else:
        return False
    metrics.egress_refused()
    with contextlib.suppress(OSError):
        conn.send(error_response(429, f"arcp-supervisor egress proxy: {text}"))
        conn.shutdown(socket.SHUT_WR)
        conn.recv(MAX_HEAD)  # what the job sent already: closing on unread bytes would reset the answer
    return True
