"""Provisioned credentials (protocol.md §8.9): issued per job, rotated, always revoked.

A provisioner is any object with `issue`, `rotate` and `revoke` (the Provisioner
protocol below), named in the config:

    [credentials]
    provisioner = "static"                  # or "package.module:factory"
    [credentials.options]                   # passed to the factory as keyword arguments
    endpoint = "https://gateway.example/v1"

Credentials reach the client in `job.accepted` (bearer only: the Python client
refuses other schemes) and the agent through its JobContext, never through the
environment. Every terminal revokes the job's credentials; a revocation that
fails is kept in the store and retried, across restarts too.
"""

from __future__ import annotations

import importlib
import secrets
from typing import Any, Protocol

from shared.ids import new_id


class ProvisionerError(Exception):
    """The provisioner could not do what was asked (issue, rotate or revoke)."""


class Provisioner(Protocol):
    def issue(self, job_id: str, principal: str, lease: dict[str, list[str]],
              expires_at: str | None) -> list[dict[str, Any]]:
        """Credentials for one job: each {id, scheme: "bearer", value, endpoint?, profile?, constraints?}."""

    def rotate(self, credential_id: str, new_value: str) -> None:
        """The credential now has `new_value`; its previous value stops working."""

    def revoke(self, credential_id: str) -> None:
        """The credential stops working; raises ProvisionerError when that could not be done."""


class StaticProvisioner:
    """A development provisioner: one opaque bearer token per job, tracked in memory.

    `fail_revocations` makes the next N revocations fail, to exercise the retries.
    """

    def __init__(self, endpoint: str = "https://gateway.invalid/v1", profile: str = "dev",
                 fail_revocations: int = 0) -> None:
        self.endpoint = endpoint
        self.profile = profile
        self.fail_revocations = fail_revocations
        self.live: dict[str, str] = {}  # credential id -> current value
        self.revoked: list[str] = []

    def issue(self, job_id: str, principal: str, lease: dict[str, list[str]],
              expires_at: str | None) -> list[dict[str, Any]]:
        cred_id = new_id("cred")
        value = "sk-dev-" + secrets.token_urlsafe(24)
        self.live[cred_id] = value
        constraints: dict[str, Any] = {k: v for k, v in lease.items() if k in ("cost.budget", "model.use")}
        if expires_at:
            constraints["expires_at"] = expires_at
        cred: dict[str, Any] = {"id": cred_id, "scheme": "bearer", "value": value, "endpoint": self.endpoint,
                                "profile": self.profile}
        if constraints:
            cred["constraints"] = constraints
        return [cred]

    def rotate(self, credential_id: str, new_value: str) -> None:
        if credential_id not in self.live:
            raise ProvisionerError(f"no live credential {credential_id!r}")
        self.live[credential_id] = new_value

    def revoke(self, credential_id: str) -> None:
        if self.fail_revocations > 0:
            self.fail_revocations -= 1
            raise ProvisionerError(f"revocation of {credential_id} failed (simulated)")
        self.live.pop(credential_id, None)
        self.revoked.append(credential_id)


def load_provisioner(spec: str, options: dict[str, Any]) -> Provisioner:
    """`static`, or `module:factory` called with the options as keyword arguments."""
    if spec == "static":
        return StaticProvisioner(**options)
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise ValueError(f"provisioner {spec!r} is neither 'static' nor MODULE:FACTORY")
    factory = getattr(importlib.import_module(module_name), attr)
    provisioner: Provisioner = factory(**options)
    return provisioner
