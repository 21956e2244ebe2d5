"""A reused worker's next job meets nothing its last job left: processes of its cgroup are
killed before the worker takes another job, and a worker left with a thread, a child
process or a changed sys.modules is retired (the next job runs on a fresh worker)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared import pipe_messages as pm
from supervisor.sandbox.worker_cgroup import WorkerCgroup
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


PIDS_V1 = "/sys/fs/cgroup/pids"
_TASKS = """
import os, sys, threading, time
stop = threading.Event()
threads, children = [], []
for cmd in sys.stdin:
    cmd = cmd.strip()
    if cmd == "thread":
        threads.append(threading.Thread(target=stop.wait))
        threads[-1].start()
    elif cmd == "fork":
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    elif cmd == "end":
        stop.set()
        for t in threads:
            t.join()
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        threads, children = [], []
    print("ok", flush=True)
"""


@pytest.mark.skipif(not os.access(PIDS_V1, os.W_OK), reason="no cgroup v1 pids hierarchy to make a group in")
def test_the_count_a_kept_worker_is_judged_by_is_the_kernels_count_now() -> None:
    """The pool keeps a worker on one read of its group's pids.current (pool._idle_by_count),
    through a descriptor kept open: every read is the count at that moment, threads and
    processes coming and going, and never a list read once and kept."""
    d = f"{PIDS_V1}/arcp-test-count-{os.getpid()}"
    os.mkdir(d)
    p = subprocess.Popen([sys.executable, "-c", _TASKS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with open(f"{d}/cgroup.procs", "w") as f:
            f.write(str(p.pid))
        cg = WorkerCgroup({"pids": d}, v2=False)

        def count_becomes(n: int) -> None:
            deadline = time.monotonic() + 5
            while cg.pids_current() != n:  # a thread's exit is counted a moment after its join
                assert time.monotonic() < deadline, f"pids.current stays {cg.pids_current()}, not {n}"
                time.sleep(0.01)

        def do(cmd: str) -> None:
            assert p.stdin is not None and p.stdout is not None
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
            assert p.stdout.readline() == "ok\n"

        count_becomes(1)
        do("thread")
        count_becomes(pm.IDLE_THREADS)  # what an idle worker has: kept on the count
        do("fork")
        count_becomes(pm.IDLE_THREADS + 1)  # a process left behind: not
        do("thread")
        count_becomes(pm.IDLE_THREADS + 2)
        do("end")
        count_becomes(1)
    finally:
        p.kill()
        p.wait()
        deadline = time.monotonic() + 5
        while True:
            try:
                os.rmdir(d)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
