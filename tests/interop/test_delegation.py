"""Delegation (protocol.md §8.10, §11.8): child jobs whose lease is a subset of their parent's."""

from __future__ import annotations

import asyncio
from typing import Any

import arcp
import pytest

from tests.conftest import Server
from tests.interop.client import sdk_session

PARENT_LEASE = {"agent.delegate": ["echo@*", "sleep@*"], "fs.read": ["/data/**"], "cost.budget": ["USD:5"]}


def test_agent_delegates_a_child_within_its_lease(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="delegator", lease_request=PARENT_LEASE, input={
                "agent": "echo@1.0.0", "input": {"x": 1},
                "lease": {"fs.read": ["/data/sub/**"], "cost.budget": ["USD:2"]}, "wait": 0.5})
            r = (await asyncio.wait_for(h.done, 15)).result
            child = r["child"]
            assert r["budget"] == {"USD": "3"}, "the child's budget is carved out of the parent's"
            ev = await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event"
                                    and f["payload"]["kind"] == "delegate")
            assert ev["payload"]["body"] == {"child_job_id": child, "agent": "echo@1.0.0",
                                             "lease": {"fs.read": ["/data/sub/**"], "cost.budget": ["USD:2"]}}
            term = await rec.terminal(child)
            assert term["payload"]["result"] == {"echo": {"x": 1}}
            listed = {j.job_id: j for j in (await client.list_jobs()).jobs}
            assert listed[child].parent_job_id == h.job_id
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
            parent = await client.submit(agent="sleep", input={"seconds": 2}, lease_request=PARENT_LEASE)
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
