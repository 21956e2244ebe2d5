"""The supervisor's side of provisioned credentials (protocol.md §8.9): issue at submit,
rotate on an agent's request, revoke at every terminal and retry a failed revocation
(50 ms, 250 ms, 1 s, then every 5 s), across restarts too. The provisioner is
third-party code: each call runs in a worker thread, never on the event loop.

With several processes on one database (supervisor/cluster/), a process's start revokes
only what finished jobs left (the others' running jobs keep theirs), and each process
sweeps now and then for credentials of jobs that another process finished, or was
declared lost with, and never revoked: a provisioner's revoke must accept a credential
revoked already (it may be asked twice when a process dies in the middle)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

from shared.errors import InternalError, InvalidRequest
from supervisor.core.jobs import Job, SubmitRequest
from supervisor.jobs.credentials import Provisioner, ProvisionerError
from supervisor.state.base import StateStore

log = logging.getLogger("arcp.runtime")
REVOKE_BACKOFF = (0.05, 0.25, 1.0, 5.0)
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], bool]  # False: not run (closing)


class Credentials:
    def __init__(self, provisioner: Provisioner, store: StateStore, spawn: Spawn) -> None:
        self.provisioner = provisioner
        self.store = store
        self._spawn = spawn
        self._revoking: set[str] = set()  # credential ids whose revocation runs here

    async def revoke_left_behind(self, shared: bool = False) -> None:
        """At start: what a crash left unrevoked is revoked now: of any job, or with a
        `shared` database, of finished jobs only (this process's own unfinished ones were
        ended by the store's recovery; other processes' are running)."""
        for cred_id in await self.store.unrevoked_credentials(finished_only=shared):
            self.revoke(cred_id)

    async def sweep(self, age: float) -> int:
        """Revoke the credentials of jobs finished more than `age` seconds ago (time left to
        their own process) that are still unrevoked and not being revoked here (their process
        died first, or was declared lost); how many."""
        before = time.time_ns() - int(age * 1e9)
        left = [c for c in await self.store.unrevoked_credentials(True, before) if c not in self._revoking]
        for cred_id in left:
            log.info("revoking %s: its job finished and the credential was never revoked", cred_id)
            self.revoke(cred_id)
        return len(left)

    async def issue(self, job_id: str, principal: str, req: SubmitRequest) -> list[dict[str, Any]]:
        expires = req.lease_constraints.get("expires_at")
        try:
            creds = await anyio.to_thread.run_sync(self.provisioner.issue, job_id, principal, req.lease, expires)
        except ProvisionerError as e:
            raise InternalError(f"the credential provisioner failed: {e}") from e
        if not isinstance(creds, list):
            raise InternalError("the credential provisioner returned something other than a list")
        for c in creds:
            if not isinstance(c, dict) or c.get("scheme") != "bearer" or not isinstance(c.get("id"), str) \
                    or not isinstance(c.get("value"), str):
                raise InternalError("the credential provisioner returned a credential that is not bearer "
                                    "{id, scheme, value}")
        return creds

    def issued(self, job: Job, creds: list[dict[str, Any]]) -> None:
        job.credentials = creds
        self.store.add_credentials(job.id, [c["id"] for c in creds])

    async def rotate(self, job: Job, credential_id: str, new_value: str) -> dict[str, Any]:
        """An agent rotates one of its job's credentials; the credential, updated."""
        cred = next((c for c in job.credentials if c["id"] == credential_id), None)
        if cred is None:
            raise InvalidRequest(f"credential {credential_id[:128]!r} is not one of this job's")
        try:
            await anyio.to_thread.run_sync(self.provisioner.rotate, credential_id, new_value)
        except ProvisionerError as e:
            raise InternalError(f"rotation failed: {e}") from e
        cred["value"] = new_value
        return cred

    async def revoke_all(self, credential_ids: list[str]) -> None:
        """A job ended: one attempt at each of its credentials (at once, in threads), before
        its terminal frame leaves; one that fails is retried in the background until it is
        revoked (and after a restart)."""
        async def first(cred_id: str) -> None:
            self._revoking.add(cred_id)
            if await self._attempt(cred_id, 0):
                self._revoking.discard(cred_id)
            elif not self._spawn(lambda: self._retry(cred_id)):
                self._revoking.discard(cred_id)

        async with anyio.create_task_group() as tg:
            for cred_id in credential_ids:
                tg.start_soon(first, cred_id)

    def revoke(self, credential_id: str) -> None:
        """Revoke in the background, retried until it is done."""
        async def attempts() -> None:
            if not await self._attempt(credential_id, 0):
                await self._retry(credential_id)
            else:
                self._revoking.discard(credential_id)

        if credential_id in self._revoking:
            return
        self._revoking.add(credential_id)
        if not self._spawn(attempts):
            self._revoking.discard(credential_id)

    async def _retry(self, credential_id: str) -> None:
        try:
            attempt = 1
            while not await self._attempt(credential_id, attempt):
                attempt += 1
        finally:
            self._revoking.discard(credential_id)

    async def _attempt(self, credential_id: str, attempt: int) -> bool:
        """One revocation; False (after the back-off of this attempt) when it failed."""
        try:
            await anyio.to_thread.run_sync(self.provisioner.revoke, credential_id)
        except Exception as e:  # a provisioner is third-party code: any failure means retry
            self.store.revocation_attempted(credential_id, revoked=False)
            delay = REVOKE_BACKOFF[min(attempt, len(REVOKE_BACKOFF) - 1)]
            log.warning("revocation of %s failed (%s); retrying in %.2f s", credential_id, e, delay)
            await anyio.sleep(delay)
            return False
        self.store.revocation_attempted(credential_id, revoked=True)
        return True
