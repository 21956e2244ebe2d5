"""`cpu_sec` holds for the job's whole process tree (its cgroup's CPU time), not per process:
a job cannot spread its CPU over short-lived children that each stay under the limit."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Server
from tests.interop.client import sdk_session
from tests.interop.test_recycled_limits import recycled

LIMITS = "x-vendor.arcp-supervisor.limits"
USAGE = "x-vendor.arcp-supervisor.usage"


async def _run(url: str, input: Any, limits: list[str]) -> tuple[dict[str, Any], list[str]]:
    async with sdk_session(url) as (client, rec):
        h = await client.submit(agent="cpuchildren", input=input, lease_request={LIMITS: limits})
        t = await rec.terminal(h.job_id, timeout=60)
        return t, list((h.accepted.model_extra or {})["x-vendor.arcp-supervisor.sandbox"])


def _needs_cpu_accounting(layers: list[str]) -> None:
    if not {"cgroup-v1-cpuacct", "cgroup-v2-unified"} & set(layers):
        pytest.skip(f"no cgroup CPU accounting here: {layers}")


def test_cpu_spread_over_short_lived_children_is_a_timeout(server: Server) -> None:
    async def go() -> None:
        # 20 children of 0.5 s each: 10 s in all, none of them near the 1 s rlimit
        t, layers = await _run(server.url, {"n": 20, "each": 0.5}, ["cpu_sec:1"])
        _needs_cpu_accounting(layers)
        p = t["payload"]
        assert t["type"] == "job.error" and p["code"] == "TIMEOUT", t
        assert p["message"] == "cpu time limit 1 s exceeded" and p["retryable"] is False, p
        assert p["details"] == {"limit": "cpu_sec", "value": 1}, p
        # Counted in CPU time, which a busy host does not stretch: killed near its 1 s, long
        # before the 10 s its children would burn.
        u = p[USAGE]
        cpu = u["cpu_user_s"] + u["cpu_sys_s"]
        assert cpu < 5.0, f"killed only after {cpu:.1f} s of CPU"
    asyncio.run(go())


def test_a_job_under_the_limit_succeeds_on_recycled_groups(server: Server) -> None:
    """Each job's CPU time counts from its own start: groups that ran earlier jobs (0.6 s each,
    more than 1 s in all) take the next ones, which succeed."""
    async def go() -> None:
        runs: dict[str, int] = {}  # the jobs each group ran
        for _ in range(8):
            t, layers = await _run(server.url, {"n": 2, "each": 0.3}, ["cpu_sec:1"])
            _needs_cpu_accounting(layers)
            assert t["type"] == "job.result" and t["payload"]["result"]["children"] == 2, t
            groups = t["payload"]["result"]["cgroups"]
            ctl = "cpuacct" if "cpuacct" in groups else "unified"
            runs[groups[ctl]] = runs.get(groups[ctl], 0) + 1
            await recycled(groups, ctl)
        assert max(runs.values()) >= 2, f"no group was recycled: {runs}"
    asyncio.run(go())
