"""Delegation (protocol.md §8.10, §11.8): child jobs whose lease is a subset of their parent's."""

from __future__ import annotations

import asyncio
from typing import Any

import arcp
import pytest

from tests.conftest import Server
from tests.interop.client import listed, sdk_session

PARENT_LEASE = {"agent.delegate": ["echo@*", "sleep@*"], "fs.read": ["/data/**"], "cost.budget": ["USD:5"]}


def test_agent_delegates_a_child_within_its_lease(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="delegator", lease_request=PARENT_LEASE, input={
                "agent": "echo@1.0.0", "input": {"x": 1},
                "lease": {"fs.read": ["/data/sub/**"], "cost.budget": ["USD:2"]},
                "wait": 3})  # the parent's end ends the child: time enough for it to finish first
            r = (await asyncio.wait_for(h.done, 15)).result
            child = r["child"]
            assert r["budget"] == {"USD": "3"}, "the child's budget is carved out of the parent's"
            ev = await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event"
                                    and f["payload"]["kind"] == "delegate")
            assert ev["payload"]["body"] == {"child_job_id": child, "agent": "echo@1.0.0",
                                             "lease": {"fs.read": ["/data/sub/**"], "cost.budget": ["USD:2"]}}
            term = await rec.terminal(child)
            assert term["payload"]["result"] == {"echo": {"x": 1}}
            assert (await listed(client, child))[child].parent_job_id == h.job_id
    asyncio.run(go())


@pytest.mark.parametrize("agent, lease, code", [
    ("echo@1.0.0", {"fs.read": ["/etc/**"]}, "LEASE_SUBSET_VIOLATION"),
    ("echo@1.0.0", {"fs.read": ["/data/**", "/data2/x"]}, "LEASE_SUBSET_VIOLATION"),
    ("echo@1.0.0", {"cost.budget": ["USD:6"]}, "LEASE_SUBSET_VIOLATION"),
    ("echo@1.0.0", {"cost.budget": ["EUR:1"]}, "LEASE_SUBSET_VIOLATION"),
    ("logs@0.0.0", {}, "PERMISSION_DENIED"),
])
def test_delegation_outside_the_parent_lease_is_refused(server: Server, agent: str, lease: dict[str, Any],
                                                        code: str) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            h = await client.submit(agent="delegator", lease_request=PARENT_LEASE,
                                    input={"agent": agent, "lease": lease})
            with pytest.raises(arcp.ARCPError) as ei:
                await asyncio.wait_for(h.done, 15)
            assert ei.value.code == code
    asyncio.run(go())


def test_client_submits_a_child_with_parent_job_id(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            # runs until cancelled below: its end would end the child
            parent = await client.submit(agent="sleep", input={"seconds": 60}, lease_request=PARENT_LEASE)
            child = await client.submit(agent="echo@1.0.0", input=7, parent_job_id=parent.job_id,
                                        lease_request={"fs.read": ["/data/a/*"]})
            assert child.accepted.parent_job_id == parent.job_id
            assert (await asyncio.wait_for(child.done, 15)).result == {"echo": 7}
            await rec.wait_for(lambda f: f.get("job_id") == parent.job_id and f.get("type") == "job.event"
                               and f["payload"]["kind"] == "delegate")
            for kw, code in (({"parent_job_id": "job_01ARZ3NDEKTSV4RRFFQ69G5FAV"}, "JOB_NOT_FOUND"),
                             ({"parent_job_id": parent.job_id, "lease_request": {"net.fetch": ["https://x/**"]}},
                              "LEASE_SUBSET_VIOLATION")):
                async with sdk_session(server.url) as (other, _):
                    with pytest.raises(arcp.ARCPError) as ei:
                        await other.submit(agent="echo@1.0.0", input=1, **kw)
                    assert ei.value.code == code
            await client.cancel_job(parent.job_id)
            await rec.terminal(parent.job_id)
    asyncio.run(go())


def test_children_end_with_their_parent(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="delegator", lease_request=PARENT_LEASE,
                                    input={"agent": "sleep", "input": {"seconds": 30}})
            child = (await asyncio.wait_for(h.done, 15)).result["child"]
            term = await rec.terminal(child, timeout=10)
            assert term["payload"]["code"] == "CANCELLED"
            assert h.job_id in term["payload"]["message"]
    asyncio.run(go())


LIMITS = "x-vendor.arcp-supervisor.limits"
TIGHT_PARENT = {"agent.delegate": ["ownlimits@*", "echo@*"], LIMITS: ["cpu_sec:2", "max_procs:4", "memory_mb:64"],
                "cost.budget": ["USD:1"]}


@pytest.mark.parametrize("lease, cpu, procs, child_budget, parent_after", [
    ({}, 2, 4, "1", "0.75"),  # asks nothing: the parent's limits, and the parent's budget shared
    ({LIMITS: ["cpu_sec:1", "max_procs:16"]}, 1, 4, "1", "0.75"),  # tighter is kept, looser clamped
    ({"cost.budget": ["USD:0.5"]}, 2, 4, "0.5", "0.5"),  # its own budget, carved from the parent's
])
def test_a_delegated_child_runs_within_its_parents_limits_and_budget(
        server: Server, lease: dict[str, Any], cpu: int, procs: int, child_budget: str, parent_after: str) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="watchbudget", lease_request=TIGHT_PARENT, input={
                "agent": "ownlimits", "input": {"spend": 0.25}, "lease": lease, "wait": 5})
            parent = (await asyncio.wait_for(h.done, 20)).result
            term = await rec.terminal(parent["child"])
            child = term["payload"]["result"]
            assert (child["cpu_sec"], child["max_procs"]) == (cpu, procs)
            assert child["budget"] == {"USD": child_budget}
            assert child["budget_after"] == {"USD": str(float(child_budget) - 0.25).rstrip("0")}
            assert parent["budget"] == {"USD": parent_after}, "a shared budget is spent by the child"
    asyncio.run(go())


def test_a_client_submitted_child_gets_its_parents_limits_and_budget(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            # runs until cancelled below: its end would end the child
            parent = await client.submit(agent="sleep", input={"seconds": 60},
                                         lease_request={**TIGHT_PARENT, "agent.delegate": ["echo@*"]})
            child = await client.submit(agent="echo@1.0.0", input=1, parent_job_id=parent.job_id,
                                        lease_request={LIMITS: ["max_open_files:64", "cpu_sec:9"]})
            extra = child.accepted.model_extra or {}
            assert extra[LIMITS] == {"memory_mb": 64, "cpu_sec": 2, "max_procs": 4, "max_open_files": 64,
                                     "max_file_size_mb": 1024, "runtime_sec": 3600}
            assert sorted(child.accepted.lease[LIMITS]) == ["cpu_sec:2", "max_open_files:64"]
            assert child.accepted.budget == {"USD": "USD:1"}
            assert (await asyncio.wait_for(child.done, 15)).result == {"echo": 1}
            await client.cancel_job(parent.job_id)
            await rec.terminal(parent.job_id)
    asyncio.run(go())
