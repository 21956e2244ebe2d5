"""Limits always hold on recycled cgroups (contract.md "Limits always hold"): a group that ran
a tight job takes a loose one and a tight one again, the kernel enforces exactly the
limits echoed in job.accepted, and a limit that cannot be applied ends the job instead
of falling back to a weaker layer."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Server
from tests.interop.client import poll, sdk_session

CG = "/sys/fs/cgroup"
LIMITS = "x-vendor.arcp-supervisor.limits"
MiB = 1 << 20
# How long the supervisor keeps a dead worker's cgroup for its job to read before the next
# worker may take it (its CGROUP_LINGER); nothing tells a client when that has happened.
CGROUP_LINGER = 0.5


@pytest.fixture(scope="module")
def small() -> Iterator[Server]:
    """A server whose memory ceiling is 512 MiB."""
    s = Server("--memory", "512M")
    yield s
    s.stop()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _in_force(groups: dict[str, str]) -> dict[str, str]:
    """The limits the kernel holds for the job's groups, read from the host."""
    out = {}
    if "memory" in groups:
        d = f"{CG}/memory{groups['memory']}"
        out["memory"] = _read(f"{d}/memory.limit_in_bytes")
        if os.path.exists(f"{d}/memory.memsw.limit_in_bytes"):
            out["memsw"] = _read(f"{d}/memory.memsw.limit_in_bytes")
    if "pids" in groups:
        out["pids"] = _read(f"{CG}/pids{groups['pids']}/pids.max")
    return out


def _procs(ctl: str, path: str) -> list[str]:
    """The tasks in the group `path` of controller `ctl` (none if the group is gone)."""
    base = f"{CG}/{ctl}"
    if ctl == "unified" and not os.path.isdir(base):
        base = CG  # cgroup v2 alone, mounted at the top
    try:
        return _read(f"{base}{path}/cgroup.procs").split()
    except FileNotFoundError:
        return []


async def recycled(groups: dict[str, str], *ctls: str) -> None:
    """Return once the groups (of controllers `ctls`) of a job that has ended can go to the
    next worker: its worker has left them, and the time the supervisor keeps a dead worker's
    group for its job to read has passed (it tells no one when it hands the group on)."""
    async def empty() -> bool | None:
        return not any(_procs(c, groups[c]) for c in ctls) or None
    await poll(empty, f"the worker to leave its groups {[groups[c] for c in ctls]}")
    await asyncio.sleep(CGROUP_LINGER + 0.2)


async def _job(url: str, agent: str, input: Any, limits: list[str] | None = None) -> dict[str, Any]:
    """Run one job; its terminal, its groups and the limits in force while it ran."""
    async with sdk_session(url) as (client, rec):
        kw: dict[str, Any] = {"lease_request": {LIMITS: limits}} if limits else {}
        h = await client.submit(agent=agent, input=input, **kw)
        layers = (h.accepted.model_extra or {})["x-vendor.arcp-supervisor.sandbox"]
        if not {"cgroup-v1-memory", "cgroup-v1-pids"} <= set(layers):
            pytest.skip(f"no v1 memory and pids cgroups here: {layers}")
        ev = await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event"
                                and f["payload"]["body"].get("message") == "cgroups", timeout=15)
        groups = ev["payload"]["body"]["fields"]
        in_force = _in_force(groups)
        t = await rec.terminal(h.job_id, timeout=30)
        return {"terminal": t, "groups": groups, "in_force": in_force,
                "echo": (h.accepted.model_extra or {})[LIMITS]}


def test_memory_limits_follow_each_job_on_recycled_groups(small: Server) -> None:
    """100 MiB jobs, then jobs with no client limit (512 MiB) that use 300 MiB, then 100 MiB
    again: every one succeeds under exactly its own limit, in groups the others used."""
    async def go() -> None:
        used: dict[str, list[int]] = {}  # memory group -> the limits (MiB) of the jobs it ran
        for mib, alloc in [(100, 20)] * 5 + [(512, 300)] * 5 + [(100, 20)] * 3:
            r = await _job(small.url, "cgrouphog", {"mb": alloc},
                           [f"memory_mb:{mib}"] if mib != 512 else None)
            t = r["terminal"]
            assert t["type"] == "job.result" and t["payload"]["result"]["allocated"] == alloc, t
            assert r["echo"]["memory_mb"] == mib
            want = str(mib * MiB)
            assert r["in_force"]["memory"] == want and r["in_force"].get("memsw", want) == want, r
            used.setdefault(r["groups"]["memory"], []).append(mib)
            await recycled(r["groups"], "memory")
        assert any(100 in v and 512 in v for v in used.values()), f"no group was recycled: {used}"
    asyncio.run(go())


def test_the_memory_message_names_the_limit_in_force(small: Server) -> None:
    async def go() -> None:
        for _ in range(3):  # tight groups to recycle
            r = await _job(small.url, "cgrouphog", {"mb": 10}, ["memory_mb:100"])
            await recycled(r["groups"], "memory")
        r = await _job(small.url, "cgrouphog", {"mb": 250}, ["memory_mb:300"])
        assert r["terminal"]["type"] == "job.result", r["terminal"]
        assert r["in_force"]["memory"] == str(300 * MiB)
        r = await _job(small.url, "cgrouphog", {"mb": 1024}, ["memory_mb:200"])
        p = r["terminal"]["payload"]
        assert r["in_force"]["memory"] == str(200 * MiB), r
        assert p["code"] == "INTERNAL_ERROR" and p["message"] == "memory limit 200 MiB exceeded", p
        assert p["details"]["limit"] == "memory_mb" and p["details"]["value"] == 200, p
    asyncio.run(go())


def test_process_limits_follow_each_job_on_recycled_groups(small: Server) -> None:
    """max_procs:8 (with a tight memory limit too), then no limit (64), then 8 again: a job
    that forks until refused gets EAGAIN exactly when its group holds 8 tasks."""
    async def go() -> None:
        used: dict[str, list[int]] = {}
        for procs in [8] * 4 + [64] * 4 + [8] * 3:
            limits = ["max_procs:8", "memory_mb:100"] if procs == 8 else None
            r = await _job(small.url, "forkcount", {"n": 20}, limits)
            res = r["terminal"]["payload"].get("result")
            assert r["terminal"]["type"] == "job.result", r["terminal"]
            assert r["in_force"]["pids"] == str(procs), r
            if procs == 8:
                assert res["refused"] == "EAGAIN" and res["forked"] + res["threads"] == 8, res
            else:
                assert res == {"forked": 20, "refused": None, "threads": res["threads"]}, res
            used.setdefault(r["groups"]["pids"], []).append(procs)
            await recycled(r["groups"], "memory", "pids")
        assert any(8 in v and 64 in v for v in used.values()), f"no group was recycled: {used}"
    asyncio.run(go())


def test_a_limit_the_kernel_refuses_ends_the_job_and_retires_the_group(small: Server) -> None:
    """1 MiB is below what the worker already holds, and there is no swap to push it to: the
    kernel refuses the limit (EBUSY), and the job ends instead of running under the watchdog."""
    async def go() -> None:
        async with sdk_session(small.url) as (client, rec):
            h = await client.submit(agent="echo", input=1, lease_request={LIMITS: ["memory_mb:1"]})
            t = await rec.terminal(h.job_id, timeout=15)
        if t["type"] == "job.result":
            pytest.skip("the kernel reclaimed the worker's memory below 1 MiB (swap?)")
        p = t["payload"]
        assert p["code"] == "INTERNAL_ERROR" and p["retryable"] is True, p
        assert p["message"].startswith("could not apply memory limit 1 MiB (cgroup-v1-memory): "), p
        assert p["details"] == {"limit": "memory_mb", "value": 1, "layer": "cgroup-v1-memory"}, p
        r = await _job(small.url, "cgrouphog", {"mb": 300})  # the server goes on; full limits hold
        assert r["terminal"]["type"] == "job.result" and r["in_force"]["memory"] == str(512 * MiB), r
    asyncio.run(go())
