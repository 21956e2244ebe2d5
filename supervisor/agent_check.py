"""The start-up check: every registered agent imported once, in a sandboxed worker like a job's.

A module that does not import there (a syntax error, a missing dependency, a
path the sandbox does not let it read) or that lacks its function would
otherwise fail every job of that agent. `run` ends with status 2 instead,
naming the agent and the error, before it binds; `doctor` runs the same check
for the agents it is given.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shared import pipe_messages as pm
from shared.pipe_codec import CodecError, FrameDecoder, encode
from supervisor.sandbox.worker_cgroup import LimitNotApplied
from supervisor.config import AgentEnvironment, AgentSpec, Limits
from supervisor.jobs.worker_handle import CGROUP_LINGER, WorkerSpawnError
from supervisor.jobs.worker_rpc import Done, Fail, WorkerFrames, WorkerProtocolError

if TYPE_CHECKING:
    from supervisor.runtime import Runtime

CHECK_TIMEOUT = 30.0  # seconds one agent's import may take


async def check_agents(rt: Runtime, agents: Sequence[AgentSpec] | None = None) -> list[str]:
    """One line per agent that cannot run ("NAME@VERSION (MODULE:FUNCTION): why"); [] if all can.
    `agents` defaults to the configured ones. Agents that share an entry are checked once."""
    agents = rt.config.agents if agents is None else agents
    by_entry: dict[tuple[str, AgentEnvironment], list[str]] = {}
    limits: dict[tuple[str, AgentEnvironment], Limits] = {}
    for a in agents:
        by_entry.setdefault((a.entry, a.environment), []).append(f"{a.name}@{a.version}")
        limits.setdefault((a.entry, a.environment), a.limits)
    problems = []
    for (entry, env), names in by_entry.items():
        why = await _check_one(rt, entry, env, names[0], limits[(entry, env)])
        if why is not None:
            where = "" if env.is_default else f" on {env.describe()}"
            problems.append(f"agent {', '.join(names)} ({entry}{where}): {why}")
    return problems


async def _check_one(rt: Runtime, entry: str, env: AgentEnvironment, agent: str, limits: Limits) -> str | None:
    try:
        pool = (await rt.environments.get(env)).pool
        worker = await pool.acquire(("agent-check", entry, env))
    except (WorkerSpawnError, TimeoutError, OSError) as e:
        return f"could not start a worker: {e}"
    try:
        spec: dict[str, Any] = {
            "job_id": "agent-check", "session_id": "", "trace_id": "", "agent": agent, "entry": entry,
            "check": True, "input": None, "lease": {}, "lease_constraints": {},
            "limits": limits.as_wire(), "tmp_dir": worker.tmp_dir, "tmp_size": None,
        }
        if rt.uids is not None:
            uid = worker.uid = await rt.uids.acquire()
            uids = rt.uids
            loop = asyncio.get_running_loop()
            worker.exited.add_done_callback(
                lambda _: loop.call_later(CGROUP_LINGER, uids.release, uid, worker.cgroup is None))
            spec["uid"] = uid
        if worker.cgroup is not None:
            worker.cgroup.set_limits(limits.memory, limits.max_procs)
        assert worker.writer is not None and worker.reader is not None
        worker.writer.write(encode([pm.JOB, spec], pm.MAX_PIPE_FRAME))
        return await asyncio.wait_for(_outcome(worker.reader), CHECK_TIMEOUT)
    except TimeoutError:
        return f"importing it took longer than {CHECK_TIMEOUT:.0f} s"
    except (OSError, LimitNotApplied) as e:
        return f"the check could not run: {e}"
    finally:
        pool.retire(worker)


async def _outcome(reader: asyncio.StreamReader) -> str | None:
    decoder = FrameDecoder(pm.MAX_PIPE_FRAME)
    frames = WorkerFrames("agent-check", 1 << 20, 1 << 16)
    while True:
        data = await reader.read(1 << 16)
        if not data:
            return "the worker ended before importing it"
        try:
            for f in decoder.feed(data):
                with contextlib.suppress(WorkerProtocolError):  # output while importing: not the answer
                    for action in frames.actions(f):
                        if isinstance(action, Done):
                            return None
                        if isinstance(action, Fail):
                            return str(action.error.get("message") or action.error.get("code"))
        except CodecError as e:
            return f"the worker sent an invalid frame: {e}"
