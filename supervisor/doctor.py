"""`arcp-supervisor doctor`: what isolation this host offers, what `run` uses, what is missing.

The layers are those `run` decides at start (sandbox/layers.py), from this host's facts
and what `run` would set up here, each piece tried the way `run` does it (no guesses);
each guarantee of contract.md "What a job cannot do" is listed with the layers that
enforce it here, and the exit status is 1 when any guarantee has none.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from supervisor.sandbox.layers import Host, Layer, Setup, decide, measure

__all__ = ["Guarantee", "Layer", "SHARED_UID_ACCEPTS", "agents_report", "examine", "report"]


@dataclass
class Guarantee:
    name: str
    enforced_by: list[str] = field(default_factory=list)
    missing: str = ""

    @property
    def ok(self) -> bool:
        return not self.missing


def examine(job_uids: tuple[int, int] | None = None, allow_shared_uid: bool = False, *,
            host: Host | None = None, setup: Setup | None = None) -> tuple[list[Layer], list[Guarantee]]:
    """The layers (decided by sandbox/layers.py, as `run` decides them at start) and the
    guarantees they make: from this host and what `run` would set up on it, measured, unless
    `host` and `setup` are given."""
    host = host or Host.read()
    setup = setup or measure(host, job_uids)
    decision = decide(host, setup)
    layers = list(decision.rows)
    used = decision.used
    cgroup = next(layer.name for layer in layers if layer.name.startswith("cgroup-"))
    cgroup_bounds = used(cgroup) and setup.cgroup.bounds_memory_and_tasks
    uids_ok = used("job-uids")
    others = ["landlock-scopes", cgroup, "job-uids", "ipcns-per-worker", "netns-per-worker", "seccomp-self-only"]
    g = [
        Guarantee("files", ["landlock"] if used("landlock") else [],
                  "" if used("landlock") else "no Landlock: the filesystem is open"),
        Guarantee("network", [n for n in ("netns-empty", "landlock-net") if used(n)],
                  "" if used("netns-empty") else "no network namespace: UDP, DNS and raw sockets are not blocked"),
        Guarantee("environment", ["scrubbed-env"]),
        Guarantee("supervisor-packages", ["hidden-packages"] if used("hidden-packages") else
                  (["landlock"] if used("landlock") else []),
                  "" if used("hidden-packages") else
                  "installed packages not hidden (needs a private mount view, so root): jobs cannot import the "
                  "supervisor's packages, but can read the interpreter's own site-packages"
                  + (" (accepted: --allow-shared-uid)" if allow_shared_uid else "")),
        Guarantee("descriptors-and-privileges", ["no-new-privs", "no-capabilities", "process-group"]
                  + (["seccomp"] if used("seccomp") else []),
                  "" if used("seccomp") else "no seccomp filter"),
        Guarantee("other-jobs", [n for n in others if used(n) and (n != cgroup or cgroup_bounds)],
                  "" if all(used(n) for n in others) and cgroup_bounds else
                  "no Landlock scopes, no cgroup limiting memory and tasks, no seccomp, no job uids or no "
                  "namespaces of each worker's own: another job's (or the supervisor's) processes, limits, "
                  "scheduling or IPC can be reached"),
        Guarantee("own-uid", ["job-uids"] if uids_ok else [],
                  "" if uids_ok else ("jobs run under the supervisor's uid: they can prlimit, renice and signal "
                                      "nothing only where seccomp and Landlock refuse it, and can chmod, chown, "
                                      "utime and setxattr its files outside their lease"
                                      + (" (accepted: --allow-shared-uid)" if allow_shared_uid else ""))),
        Guarantee("host-files", ["job-uids", "idmapped-mounts"] if uids_ok and used("idmapped-mounts") else [],
                  "" if uids_ok and used("idmapped-mounts") else
                  "jobs share a uid that owns host files, or leased paths cannot be given to their uids: modes, "
                  "owners, times and extended attributes outside the lease are not protected"
                  + (" (accepted: --allow-shared-uid)" if allow_shared_uid and not uids_ok else "")),
    ]
    return layers, g


# What --allow-shared-uid accepts: the guarantees that only root (a uid of the job's own, a
# private mount view) gives.
SHARED_UID_ACCEPTS = ("own-uid", "host-files", "other-jobs", "supervisor-packages")


def report(as_json: bool, job_uids: tuple[int, int] | None = None, allow_shared_uid: bool = False, *,
           host: Host | None = None, setup: Setup | None = None) -> tuple[str, int]:
    host = host or Host.read()
    layers, guarantees = examine(job_uids, allow_shared_uid, host=host, setup=setup)
    shared_uid = not host.own_uids
    ok = all(g.ok or (allow_shared_uid and shared_uid and g.name in SHARED_UID_ACCEPTS) for g in guarantees)
    if as_json:
        import json

        data: dict[str, Any] = {
            "layers": [{"name": layer.name, "available": layer.available, "used": layer.used, "detail": layer.detail}
                       for layer in layers],
            "guarantees": [{"name": g.name, "enforced_by": g.enforced_by, "ok": g.ok, "missing": g.missing}
                           for g in guarantees],
            "ok": ok, "python": sys.version.split()[0], "kernel": os.uname().release,
        }
        return json.dumps(data, indent=2), 0 if ok else 1
    w = max([18] + [len(layer.name) for layer in layers])
    lines = [f"{'layer':{w}} {'here':5} {'used':5} detail"]
    for layer in layers:
        lines.append(f"{layer.name:{w}} {'yes' if layer.available else 'no':5} {'yes' if layer.used else 'no':5} "
                     f"{layer.detail}")
    lines.append("")
    for g in guarantees:
        by = ", ".join(g.enforced_by) or "nothing"
        lines.append(f"guarantee {g.name:28} {'OK ' if g.ok else 'NOT'} enforced by {by}"
                     + (f"; missing: {g.missing}" if g.missing else ""))
    return "\n".join(lines), 0 if ok else 1


def agents_report(config: Any, as_json: bool = False) -> tuple[list[str], bool]:
    """Import every agent of `config` in a sandboxed worker, as `run` does at start: one line
    per agent entry, and whether all of them import."""
    import asyncio

    from supervisor.agent_check import check_agents
    from supervisor.config import ConfigError
    from supervisor.runtime import Runtime

    async def go() -> list[str]:
        async with Runtime(config, lazy_environments=True) as rt:
            return await check_agents(rt)

    try:
        problems = asyncio.run(go())
    except ConfigError as e:
        return [f"agents NOT checked: {e}"], False
    failed = {p.split(" (", 1)[0] for p in problems}
    lines = []
    for a in config.agents:
        name = f"agent {a.name}@{a.version}"
        if not any(name in f for f in failed):
            where = "" if a.environment.is_default else f" on {a.environment.describe()}"
            lines.append(f"{name} ({a.entry}{where}): imports in a sandboxed worker")
    lines += [p.replace("): ", "): FAILED: ", 1) for p in problems]
    return lines, not problems
