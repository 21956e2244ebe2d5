"""Agent environments' workers: one fork server and one worker pool per environment.

Each distinct agent environment (an interpreter and import directories, see
`AgentEnvironment`) gets a fork server of its own, started on that interpreter, and a warm
pool of workers forked from it; jobs of different environments never share a fork server
or a worker. The default environment's are made at construction and started with the
runtime; another's are started at the runtime's start for the agents configured then, or
on first use for one that a reload added.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup

from supervisor.config import DEFAULT_ENVIRONMENT, AgentEnvironment
from supervisor.jobs.fork_server import ForkServer, ForkServerStartError
from supervisor.jobs.pool import WorkerPool

log = logging.getLogger("arcp.workers")


@dataclass
class EnvironmentWorkers:
    environment: AgentEnvironment
    fork_server: ForkServer
    pool: WorkerPool


Make = Callable[[AgentEnvironment], EnvironmentWorkers]
Check = Callable[[EnvironmentWorkers], None]  # raises ForkServerStartError if it cannot serve jobs


class WorkerEnvironments:
    def __init__(self, make: Make, check: Check) -> None:
        """`make` builds an environment's (not started) fork server and pool; `check` looks at
        a started fork server (job uids set up as required, for one)."""
        self._make = make
        self._check = check
        self.default = make(DEFAULT_ENVIRONMENT)
        self._started: dict[AgentEnvironment, EnvironmentWorkers] = {}
        self._starting: dict[AgentEnvironment, anyio.Lock] = {}
        self._tg: TaskGroup | None = None
        self._closed = False

    def __iter__(self) -> Iterator[EnvironmentWorkers]:
        """Every started environment's workers (the default one first)."""
        return iter(list(self._started.values()))

    async def start_one(self, tg: TaskGroup, env: AgentEnvironment) -> EnvironmentWorkers:
        """Start an environment's fork server and pool (the default one first); their pools
        run in `tg`, and so do those of environments started later on first use."""
        self._tg = tg
        return await self.get(env)

    async def get(self, env: AgentEnvironment) -> EnvironmentWorkers:
        """The environment's fork server and pool, started first if need be."""
        found = self._started.get(env)
        if found is not None:
            return found
        lock = self._starting.setdefault(env, anyio.Lock())
        async with lock:
            found = self._started.get(env)
            if found is not None:
                return found
            if self._closed or self._tg is None:
                raise ForkServerStartError("the runtime is not running")
            workers = self.default if env.is_default else self._make(env)
            await self._start(workers)
            self._started[env] = workers
            return workers

    async def _start(self, workers: EnvironmentWorkers) -> None:
        assert self._tg is not None
        fs = workers.fork_server
        try:
            await fs.astart()
            await fs.wait_ready()
            self._check(workers)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await fs.aclose()
            raise
        if not workers.environment.is_default:
            log.info("agent environment %s: fork server %d on Python %s%s", workers.environment.describe(),
                     fs.pid or 0, fs.python_version,
                     "" if fs.fast_json else " (orjson does not load there: the standard library's json)")
        await self._tg.start(workers.pool.run)

    def begin_drain(self) -> None:
        """No fork server is restarted from now on."""
        self._closed = True
        self.default.fork_server.restart = False
        for w in self:
            w.fork_server.restart = False

    async def aclose(self) -> None:
        self._closed = True
        everyone = [self.default, *[w for w in self if w is not self.default]]
        for w in everyone:
            w.pool.close()
        for w in everyone:
            await w.fork_server.aclose()
            w.fork_server.sweep_cgroups()

    def sweep_cgroups(self) -> None:
        for w in self:
            w.fork_server.sweep_cgroups()

    @property
    def idle(self) -> int:
        return sum(w.pool.idle for w in self)

    @property
    def ready(self) -> bool:
        """Every started environment's fork server serves (the default one at least)."""
        return self.default.fork_server.ready and all(w.fork_server.ready for w in self)
