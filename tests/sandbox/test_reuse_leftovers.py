"""A reused worker's next job meets nothing its last job left: processes of its cgroup are
killed before the worker takes another job, and a worker left with a thread, a child
process or a changed sys.modules is retired (the next job runs on a fresh worker)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import Server
from tests.interop.client import Recorder, sdk_session
from tests.sandbox.test_sandbox import _kill_all, _tasks_named


@pytest.fixture(scope="module")
def reuse() -> Iterator[Server]:
    s = Server("--reuse-workers", "3")
    yield s
    s.stop()


def _lease() -> dict[str, list[str]]:
    """A lease of this test's own (limits are part of the reuse key): its first job gets a
    fresh worker, whatever earlier tests left in the pool."""
    return {"x-vendor.arcp-supervisor.limits": [f"max_open_files:{500 + int.from_bytes(os.urandom(2), 'big') % 500}"]}


def _alive(pid: int) -> bool:
    """Does `pid` still run (a zombie waiting for its reaper does not)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def _dead(pid: int, seconds: float) -> bool:
    for _ in range(int(seconds / 0.02)):
        if not _alive(pid):
            return True
        await asyncio.sleep(0.02)
    return not _alive(pid)


def _stolen(rec: Recorder, job_id: str) -> list[dict[str, Any]]:
    return [f for f in rec.frames if f.get("job_id") == job_id and "stolen by" in str(f.get("payload"))]


async def _second_job(client: Any, rec: Recorder, lease: dict[str, list[str]],
                      check: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Job 2 (same principal, agent and lease): its result, and `check()` run as it starts."""
    h = await client.submit(agent="leftovers", input={"secret": "job two's input", "hold": 0.5},
                            lease_request=lease)
    await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event", timeout=15)
    seen = check() if check is not None else {}
    t = await rec.terminal(h.job_id, timeout=15)
    await asyncio.sleep(0.3)  # anything injected late would be here by now
    assert t["type"] == "job.result", t
    assert _stolen(rec, h.job_id) == [], _stolen(rec, h.job_id)
    r = t["payload"]["result"]
    assert r["input"] == {"secret": "job two's input", "hold": 0.5}
    return r, seen


def test_a_setsid_grandchild_is_killed_before_the_next_job(reuse: Server) -> None:
    tag = "lo" + os.urandom(5).hex()

    async def go() -> None:
        async with sdk_session(reuse.url) as (client, rec):
            lease = _lease()
            h = await client.submit(agent="leftovers", input={"grandchild": True, "tag": tag, "delay": 0.3},
                                    lease_request=lease)
            t1 = await rec.terminal(h.job_id, timeout=15)
            r1 = t1["payload"]["result"]
            gpid = r1["grandchild"]
            assert await _dead(gpid, 10), "the grandchild outlived its job"
            r2, seen = await _second_job(client, rec, lease, lambda: {"alive": _alive(gpid)})
            assert seen == {"alive": False}, "the grandchild ran when the next job started"
            assert r2["pid"] == r1["pid"], "the worker was clean: it should have been reused"
    try:
        asyncio.run(go())
    finally:
        _kill_all(_tasks_named(tag))


def test_a_thread_left_behind_retires_the_worker(reuse: Server) -> None:
    async def go() -> None:
        async with sdk_session(reuse.url) as (client, rec):
            lease = _lease()
            h = await client.submit(agent="leftovers", input={"thread": True}, lease_request=lease)
            r1 = (await rec.terminal(h.job_id, timeout=15))["payload"]["result"]
            assert await _dead(r1["pid"], 10), "the worker with a stray thread was kept"
            r2, _ = await _second_job(client, rec, lease)
            assert r2["pid"] != r1["pid"]
    asyncio.run(go())


def test_a_module_imported_for_good_retires_the_worker_and_a_clean_job_does_not(reuse: Server) -> None:
    async def go() -> None:
        async with sdk_session(reuse.url) as (client, rec):
            lease = _lease()
            pids = []
            for input in ({}, {"module": "tests.sandbox"}):
                h = await client.submit(agent="leftovers", input=input, lease_request=lease)
                pids.append((await rec.terminal(h.job_id, timeout=15))["payload"]["result"]["pid"])
            assert pids[0] == pids[1], f"a clean job's worker was not reused: {pids}"
            assert await _dead(pids[1], 10), "the worker with a new module was kept"
            r2, _ = await _second_job(client, rec, lease)
            assert r2["pid"] != pids[1]
    asyncio.run(go())


def test_a_lazy_import_from_the_standard_library_keeps_the_worker(reuse: Server) -> None:
    """The standard library loads some of its own modules lazily (the idna codec at a first
    getaddrinfo): that is not a module the job left."""
    async def go() -> None:
        async with sdk_session(reuse.url) as (client, rec):
            lease = _lease()
            h = await client.submit(agent="leftovers", input={"module": "colorsys"}, lease_request=lease)
            r1 = (await rec.terminal(h.job_id, timeout=15))["payload"]["result"]
            r2, _ = await _second_job(client, rec, lease)
            assert r2["pid"] == r1["pid"]
    asyncio.run(go())


def test_a_module_replaced_in_sys_modules_retires_the_worker(reuse: Server) -> None:
    async def go() -> None:
        async with sdk_session(reuse.url) as (client, rec):
            lease = _lease()
            h = await client.submit(agent="leftovers", input={"replace": "json"}, lease_request=lease)
            r1 = (await rec.terminal(h.job_id, timeout=15))["payload"]["result"]
            assert await _dead(r1["pid"], 10), "the worker with a replaced module was kept"
            r2, _ = await _second_job(client, rec, lease)
            assert r2["pid"] != r1["pid"]
    asyncio.run(go())


def test_a_child_left_running_retires_the_worker_and_dies(reuse: Server) -> None:
    tag = "lc" + os.urandom(5).hex()

    async def go() -> None:
        async with sdk_session(reuse.url) as (client, rec):
            lease = _lease()
            h = await client.submit(agent="leftovers", input={"child": True, "tag": tag}, lease_request=lease)
            r1 = (await rec.terminal(h.job_id, timeout=15))["payload"]["result"]
            assert await _dead(r1["pid"], 10), "the worker with a running child was kept"
            for pid in _tasks_named(tag):
                assert await _dead(pid, 10), "the child outlived its job"
            r2, _ = await _second_job(client, rec, lease)
            assert r2["pid"] != r1["pid"]
    try:
        asyncio.run(go())
    finally:
        _kill_all(_tasks_named(tag))
