"""Delegation (protocol.md §8.10, §11.8): a child job checked against its parent, its expiry
and limits bounded by the parent's, its budget carved from the parent's; no I/O."""

from __future__ import annotations

from shared.errors import JobNotFound, LeaseSubsetViolation, PermissionDenied
from shared.ids import format_ts
from shared.lease import LeaseError, check_subset, initial_budget, lease_allows
from supervisor.core.jobs import Job, JobTable, SubmitRequest
from supervisor.core.limits import LIMITS_KEY, within


def delegating_parent(jobs: JobTable, principal: str, req: SubmitRequest) -> Job:
    """The running parent a child names, after checking the child against it; the child's
    expiry and limits are clamped to the parent's."""
    parent = jobs.jobs.get(req.parent_job_id or "")
    if parent is None or parent.principal != principal or parent.done or parent.request is None:
        raise JobNotFound(f"no running parent job {str(req.parent_job_id)[:128]!r}")
    if not lease_allows(parent.lease, "agent.delegate", req.agent.ref):
        raise PermissionDenied(f"the parent's lease does not grant agent.delegate on {req.agent.ref!r}")
    try:  # limits are not patterns: the child's are clamped to the parent's below
        check_subset({c: p for c, p in req.lease.items() if c != LIMITS_KEY},
                     {c: p for c, p in parent.lease.items() if c != LIMITS_KEY}, parent.authority.remaining)
    except LeaseError as e:
        raise LeaseSubsetViolation(f"child lease is not a subset of the parent's: {e}") from e
    limit = parent.authority.expires_at
    if limit is not None and (req.expires_at is None or req.expires_at > limit):
        req.expires_at = limit  # a child never outlives its parent's lease
        req.lease_constraints = {**req.lease_constraints, "expires_at": format_ts(limit)}
    req.limits = within(parent.request.limits, req.limits)  # nor runs under looser limits
    return parent


def carve_budget(parent: Job, req: SubmitRequest, now: float) -> None:
    """The child's budget comes out of the parent's remaining counters (`now`: wall-clock
    seconds, for the parent's lease expiry)."""
    carve = initial_budget(req.lease)
    if carve:
        parent.authority.reserve({c: str(v) for c, v in carve.items()}, now)


def share_budget(parent: Job, child: Job) -> None:
    """A child that asked no budget spends its parent's: the same counters, so that a debit
    by either is seen by both (and by the child's own children that ask none)."""
    if child.authority.initial or not parent.authority.remaining:
        return
    child.authority.remaining = parent.authority.remaining
    child.authority.initial = dict(parent.authority.remaining)  # what it started with
