"""Usage accounting: what a job used, on its terminal frame (envelope extensions and payload)
and on `session.list_jobs` entries, measured by the kernel for its whole process tree."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from shared.landlock import landlock_abi
from tests.conftest import Server
from tests.interop.client import listed, sdk_session
from tests.sandbox.test_egress import Origin

USAGE = "x-vendor.arcp-supervisor.usage"
KEYS = {"wall_s", "cpu_user_s", "cpu_sys_s", "memory_peak_mb", "procs_peak", "net_bytes_in", "net_bytes_out"}


async def _run(url: str, agent: str, input: Any, lease: dict[str, Any] | None = None,
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(terminal frame, the job's usage) of one job, through the official Python client, which
    must still resolve the job's result with the usage among its extra fields."""
    async with sdk_session(url) as (client, rec):
        h = await client.submit(agent=agent, input=input, lease_request=lease)
        term = await rec.terminal(h.job_id, timeout=40)
        if term["type"] == "job.result":
            result = await asyncio.wait_for(h.done, 5)
            assert (result.model_extra or {})[USAGE] == term["payload"][USAGE]
        else:
            with pytest.raises(Exception):  # the client raises the job's error
                await asyncio.wait_for(h.done, 5)
        return term, _usage(term)


def _usage(term: dict[str, Any]) -> dict[str, Any]:
    u = term["payload"][USAGE]
    assert term["extensions"][USAGE] == u, term
    assert set(u) == KEYS, u
    assert all(isinstance(v, (int, float)) and v >= 0 for v in u.values()), u
    return u


def _cpu(u: dict[str, Any]) -> float:
    return float(u["cpu_user_s"] + u["cpu_sys_s"])


def test_peak_memory_of_a_job_that_touches_160_mib(server: Server) -> None:
    term, u = asyncio.run(_run(server.url, "touchmem", {"mib": 160}))
    assert term["type"] == "job.result", term
    assert u["memory_peak_mb"] >= 150, u
    assert u["memory_peak_mb"] < 1024, u


def test_a_spinners_cpu_time_is_its_wall_time(server: Server) -> None:
    term, u = asyncio.run(_run(server.url, "spinner", {"seconds": 1.0}))
    own = term["payload"]["result"]
    cpu = _cpu(u)
    assert u["cpu_user_s"] > u["cpu_sys_s"], u
    assert cpu >= own["cpu"] * 0.98, (u, own)  # the kernel saw at least what the agent saw of itself
    if own["cpu"] >= 0.9 * own["wall"]:  # it had a CPU to itself (the host was not busy)
        assert abs(cpu - u["wall_s"]) <= 0.1 * u["wall_s"], (u, own)
    else:
        assert cpu <= own["cpu"] + 0.15, (u, own)


def test_cpu_burnt_in_forked_children_counts(server: Server) -> None:
    term, u = asyncio.run(_run(server.url, "forkburn", {"n": 2, "each": 0.5}))
    assert term["type"] == "job.result", term
    assert _cpu(u) >= 0.95, u  # the children's 1 s; the parent only waits
    assert u["procs_peak"] >= 3, u


def test_procs_peak_counts_processes_held_at_once(server: Server) -> None:
    term, u = asyncio.run(_run(server.url, "holdprocs", {"n": 5, "hold": 0.5}))
    assert term["type"] == "job.result", term
    assert u["procs_peak"] >= term["payload"]["result"]["held"] == 6, u
    assert u["procs_peak"] < 64, u


def test_an_error_terminal_carries_usage_too(server: Server) -> None:
    term, u = asyncio.run(_run(server.url, "raises", {}))
    assert term["type"] == "job.error", term
    assert u["wall_s"] > 0, u


def test_a_cancelled_jobs_terminal_carries_usage(server: Server) -> None:
    async def go() -> dict[str, Any]:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="spinner", input={"seconds": 30})
            await _running_usage(client, h.job_id, 0.1)
            await client.cancel_job(h.job_id)
            return await rec.terminal(h.job_id, timeout=10)
    term = asyncio.run(go())
    u = _usage(term)
    assert term["payload"]["final_status"] != "success", term
    assert u["wall_s"] > 0 and _cpu(u) >= 0.1, u


@pytest.mark.skipif(landlock_abi() < 4, reason="the egress proxy needs Landlock ABI 4 (TCP rules)")
def test_net_bytes_of_a_fetch_match_the_body(server: Server) -> None:
    origin = Origin()
    try:
        size = 300_000
        url = f"http://127.0.0.1:{origin.port}/big/{size}"
        term, u = asyncio.run(_run(server.url, "fetch", {"url": url},
                                   {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}))
    finally:
        origin.close()
    assert term["type"] == "job.result" and term["payload"]["result"]["size"] == size, term
    assert size <= u["net_bytes_in"] <= size + 4096, u  # the body and the response's head
    assert len(f"GET /big/{size} HTTP/1.1") <= u["net_bytes_out"] <= 4096, u


async def _running_usage(client: Any, job_id: str, min_cpu: float) -> dict[str, Any]:
    """The usage of a running job in `session.list_jobs`, once it has used `min_cpu` s of CPU."""
    deadline = time.monotonic() + 20
    while True:
        entry = (await listed(client, job_id))[job_id]
        u: dict[str, Any] | None = (entry.model_extra or {}).get(USAGE)
        if entry.status == "running" and u is not None and _cpu(u) >= min_cpu:
            return u
        assert time.monotonic() < deadline, entry
        await asyncio.sleep(0.05)


def test_list_jobs_shows_the_usage_of_a_running_job_so_far(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="spinner", input={"seconds": 3.0})
            u = await _running_usage(client, h.job_id, 0.3)
            assert set(u) == KEYS and u["wall_s"] > 0 and u["procs_peak"] >= 1, u
            assert u["memory_peak_mb"] > 0, u
            term = await rec.terminal(h.job_id, timeout=20)
            final = _usage(term)
            assert final["wall_s"] >= u["wall_s"] and _cpu(final) >= _cpu(u), (u, final)
            entry = (await listed(client, h.job_id))[h.job_id]
            assert (entry.model_extra or {})[USAGE] == final
    asyncio.run(go())


def test_list_jobs_entries_carry_the_effective_limits(server: Server) -> None:
    """What `top` shows usage against: the limits echoed in job.accepted, in every entry."""
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="echo", input=1,
                                    lease_request={"x-vendor.arcp-supervisor.limits": ["memory_mb:200"]})
            await rec.terminal(h.job_id, timeout=20)
            accepted = next(f for f in rec.frames if f["type"] == "job.accepted" and f.get("job_id") == h.job_id)
            entry = (await listed(client, h.job_id))[h.job_id]
            limits = (entry.model_extra or {})["x-vendor.arcp-supervisor.limits"]
            assert limits == accepted["payload"]["x-vendor.arcp-supervisor.limits"] and limits["memory_mb"] == 200
    asyncio.run(go())
