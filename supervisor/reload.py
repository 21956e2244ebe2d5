"""SIGHUP: read `--config` again and apply what may change while jobs run.

Tokens, admins, agents (and defaults), limits, quotas and capacity take effect for
the sessions and jobs that start afterwards: a running job keeps the agent and the
limits it was accepted with, and an open session keeps its principal. Every other
setting (addresses, state, the sandbox, workers) is bound when the server starts:
a change to one is logged and waits for the next start. A file that does not
load, or that registers an agent whose module does not import in a sandboxed
worker (the start-up check, supervisor/agent_check.py), is logged and the running
configuration kept whole.

An agent added this way is not precompiled by the fork server (that happens once, at
its start): its worker imports it the ordinary way. Its module must be readable by
jobs as the modules known at start are; the check finds out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import fields, replace

import anyio

from supervisor.agent_check import check_agents
from supervisor.config import Config, ConfigError
from supervisor.core.registry import AgentRegistry
from supervisor.runtime import Runtime

log = logging.getLogger("arcp.reload")

# Config fields a reload applies; any other that changed waits for a restart.
RELOADED = frozenset({"tokens", "admins", "agents", "defaults", "limits", "quota_max_jobs", "quota_principals",
                      "max_jobs", "max_queued", "memory_budget"})


def merge(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """`loaded`'s reloadable settings over `running`'s others; and the names of those
    others that `loaded` changes (kept as they are until a restart)."""
    kept = {f.name: getattr(running, f.name) for f in fields(Config)
            if f.name not in RELOADED and getattr(loaded, f.name) != getattr(running, f.name)}
    return replace(loaded, **kept), sorted(kept)


def apply(rt: Runtime, cfg: Config) -> None:
    """From now on sessions authenticate, and submits resolve agents and limits, by `cfg`."""
    rt.config = cfg
    rt.registry = AgentRegistry(cfg.agents, cfg.defaults)
    rt.reconfigure_admission(cfg)  # capacity and quotas; a job queued before may start now


def describe(old: Config, new: Config) -> str:
    """What a reload changed, without a token in it."""
    was, now = {a.ref: a for a in old.agents}, {a.ref: a for a in new.agents}
    parts = []
    added = sorted(set(now) - set(was))
    removed = sorted(set(was) - set(now))
    changed = sorted(r for r in set(now) & set(was) if now[r] != was[r])
    if added:
        parts.append(f"agents added: {', '.join(added)}")
    if removed:
        parts.append(f"agents removed: {', '.join(removed)}")
    if changed:
        parts.append(f"agents changed: {', '.join(changed)}")
    if old.defaults != new.defaults:
        parts.append("agent defaults changed")
    if old.tokens != new.tokens:
        parts.append(f"tokens: {len(new.tokens)} (were {len(old.tokens)})")
    for name in sorted(RELOADED - {"agents", "defaults", "tokens"}):
        if getattr(old, name, None) != getattr(new, name, None):
            parts.append(f"{name} changed")
    return "; ".join(parts) or "no change"


class Reloader:
    """Runs reloads one at a time; a SIGHUP during one is taken after it. Requests made
    before `run()` starts (the server is not serving yet) wait for it; `run()` lives in the
    server's task group until the server ends."""

    def __init__(self, rt: Runtime, load: Callable[[], Config]) -> None:
        self.rt = rt
        self._load = load
        self._wanted = anyio.Event()

    def request(self) -> None:
        if self.rt.draining:
            log.info("SIGHUP: the server is draining; configuration not reloaded")
            return
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted = anyio.Event()
            if self.rt.draining:
                continue
            await self.reload()

    async def reload(self) -> bool:
        """Read and apply the configuration once; False when the running one was kept."""
        running = self.rt.config
        try:
            loaded = await anyio.to_thread.run_sync(self._load)
        except ConfigError as e:
            log.error("SIGHUP: %s; keeping the running configuration", e)
            return False
        cfg, waiting = merge(running, loaded)
        known = {(a.entry, a.environment) for a in running.agents}
        added = [a for a in cfg.agents if (a.entry, a.environment) not in known]  # (or moved to another environment)
        if added:
            problems = await check_agents(self.rt, added)
            if problems:
                log.error("SIGHUP: %s; keeping the running configuration", "; ".join(problems))
                return False
        if self.rt.draining or self.rt.config is not running:
            return False
        apply(self.rt, cfg)
        log.info("SIGHUP: configuration reloaded (%s)", describe(running, cfg))
        for name in waiting:
            log.warning("SIGHUP: setting %s changed; it takes effect at the next start", name)
        return True
