"""What a session hands to the runtime: the client's requests about jobs.

A session answers the session-level messages itself (ping, pong, ack, close); a
request that needs the job table, the workers or the store comes out of
`Session.receive` as one of these, already checked for the fields the session can
check alone. Each carries its envelope, so an error is answered with its
`request_id` and `job_id`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.envelope import Envelope


@dataclass(frozen=True)
class Submit:
    env: Envelope


@dataclass(frozen=True)
class Cancel:
    env: Envelope
    job_id: str
    reason: str


@dataclass(frozen=True)
class ListJobs:
    env: Envelope


@dataclass(frozen=True)
class Subscribe:
    env: Envelope
    job_id: str


@dataclass(frozen=True)
class Unsubscribe:
    env: Envelope
    job_id: str


Request = Submit | Cancel | ListJobs | Subscribe | Unsubscribe


def job_id_of(request: Request) -> str | None:
    """The job a request is about, for the error that answers it."""
    if isinstance(request, (Cancel, Subscribe, Unsubscribe)):
        return request.job_id
    return request.env.job_id
