"""One job's fs.* `validate_lease_op` calls: the target its kernel would open, against its lease.

The target is made absolute and clean, and its symlinks are resolved in the job's view
with its credentials (sandbox/path_resolve.py, on a resolver thread); then the lease is
asked. One resolution at a time per job; while one outlives its timeout, the job's next
checks are refused (retryable) rather than queued behind it. Refusals name the target as
the job sent it, never what it resolved to.
"""

from __future__ import annotations

import asyncio
import os
import time

from shared.errors import Cancelled, LeaseExpired, PermissionDenied, Timeout
from shared.lease import clean_path
from supervisor.core.authority import shown
from supervisor.core.jobs import Job
from supervisor.jobs.worker_handle import WorkerHandle
from supervisor.sandbox import path_resolve


class PathChecks:
    def __init__(self, job: Job) -> None:
        self._job = job
        self._lock = asyncio.Lock()
        self._stuck: asyncio.Future[str] | None = None  # a resolution that outlived its timeout

    async def check(self, cap: str, target: str, worker: WorkerHandle | None) -> None:
        """Allow `cap` on `target` for the job on `worker`, or raise the refusal (ARCPError)."""
        async with self._lock:
            await self._check(cap, target, worker)

    async def _check(self, cap: str, target: str, worker: WorkerHandle | None) -> None:
        auth = self._job.authority
        if self._job.done:  # queued behind others until after the job's end: nothing to resolve for
            raise Cancelled("job has ended")
        if auth.expired(time.time()):
            raise LeaseExpired("the job's lease has expired")
        if not target.startswith("/"):
            raise PermissionDenied(f"{cap} target {shown(target)} is not an absolute path")
        if not auth.lease.get(cap):  # nothing granted: the same verdict, without resolving anything
            auth.validate_op(cap, target, time.time(), asked=target)
        if self._stuck is not None and not self._stuck.done():
            raise Timeout(f"{cap} target {shown(target)}: an earlier path check of this job is still "
                          "running", retryable=True)
        uid = worker.uid if worker is not None else None
        try:
            resolved = await path_resolve.resolve(
                clean_path(target), uid=uid, root_pid=worker.pid if worker is not None and uid is not None else None)
        except path_resolve.PathRefused as e:
            raise PermissionDenied(f"{cap} target {shown(target)} cannot be checked: {e}") from None
        except path_resolve.ResolverBusy as e:
            raise Timeout(f"{cap} target {shown(target)}: {e}", retryable=True) from None
        except path_resolve.ResolveTimeout as e:
            self._stuck = e.pending
            raise Timeout(f"{cap} target {shown(target)}: {e}", retryable=True) from None
        except OSError as e:
            raise PermissionDenied(f"{cap} target {shown(target)} cannot be checked: "
                                   f"{os.strerror(e.errno) if e.errno else type(e).__name__}") from None
        auth.validate_op(cap, resolved, time.time(), asked=target)
