"""What Landlock does not cover, and what a job could make the kernel do for it: resource
limits and scheduling of other processes, metadata of host files, SysV IPC, inotify, the
shared port space. Each test is an attack; the default `run` (as root: job uids) stops it."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.config import DEFAULT_JOB_UIDS
from tests.conftest import Server, fork_server_pids
from tests.interop.client import sdk_session

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="job uids need a supervisor running as root")


async def _run(url: str, agent: str, input: Any, **kw: Any) -> dict[str, Any]:
    async with sdk_session(url) as (client, rec):
        h = await client.submit(agent=agent, input=input, **kw)
        t = await rec.terminal(h.job_id, timeout=30)
        assert t["type"] == "job.result", t
        result: dict[str, Any] = t["payload"]["result"]
        return result


def _fork_server(server: Server) -> int:
    pids = fork_server_pids(server.pid)
    assert pids, "no fork server"
    return pids[0]


def _observe(pid: int) -> tuple[Any, ...]:
    """What the attack would change: limits, policy, affinity, nice."""
    with open(f"/proc/{pid}/limits") as f:
        limits = f.read()
    return limits, os.sched_getscheduler(pid), os.sched_getaffinity(pid), os.getpriority(os.PRIO_PROCESS, pid)


@needs_root
def test_jobs_run_under_uids_of_their_own_by_default(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="status", input={})
            r = (await asyncio.wait_for(h.done, 30)).result
            acc = next(f for f in rec.frames if f["type"] == "job.accepted")
        layers = acc["payload"]["x-vendor.arcp-supervisor.sandbox"]
        assert "job-uids" in layers and "shared-uid" not in layers, layers
        for ns in ("mntns", "ipcns", "netns"):
            assert f"{ns}-per-worker" in layers, layers
        uid = r["uid"][0]
        assert DEFAULT_JOB_UIDS[0] <= uid <= DEFAULT_JOB_UIDS[1] and uid != os.geteuid(), r
        assert all(int(r[k], 16) == 0 for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")), r
    asyncio.run(go())


def test_resource_limits_and_scheduling_reach_only_the_job_itself(server: Server) -> None:
    """prlimit(RLIMIT_CPU/NOFILE) on the supervisor, SCHED_IDLE or an affinity on the fork
    server, a nice or I/O priority on another job: all EPERM; on itself, all fine."""
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            other = await client.submit(agent="stubborn")
            ev = await rec.wait_for(lambda f: f.get("job_id") == other.job_id and f.get("type") == "job.event")
            other_pid = int(ev["payload"]["body"]["message"].split()[1])
            pids = {"supervisor": server.pid, "forkserver": _fork_server(server), "other": other_pid}
            before = {name: _observe(pid) for name, pid in pids.items()}
            h = await client.submit(agent="reachothers", input={"pids": pids})
            r = (await asyncio.wait_for(h.done, 30)).result
            for name in pids:
                for call in ("prlimit", "sched_idle", "affinity", "nice", "ioprio", "prlimit_high"):
                    assert r[f"{call}_{name}"] == "EPERM", (call, name, r)
            for name in ("self", "zero"):
                for call in ("prlimit", "sched_idle", "nice", "ioprio"):
                    assert r[f"{call}_{name}"] == "ok", (call, name, r)
                assert r[f"prlimit_high_{name}"] == "EPERM", r  # high bits set: never let through
            assert r["nice_user"] == "EPERM", r
            after = {name: _observe(pid) for name, pid in pids.items()}
            assert after == before
            await client.cancel_job(other.job_id)
            await rec.terminal(other.job_id)
            h2 = await client.submit(agent="echo", input="after")
            assert (await asyncio.wait_for(h2.done, 15)).result == {"echo": "after"}
    asyncio.run(go())


@pytest.fixture()
def host_tree() -> Iterator[Path]:
    """Root-owned files: one outside any lease (world-readable, in a world-searchable
    directory), and a leased 0700 directory with a 0600 file, as a build tree would be."""
    d = Path(tempfile.mkdtemp(prefix="arcp-host-"))
    d.chmod(0o755)
    (d / "outside.bin").write_bytes(b"\x7fELF host binary")
    (d / "outside.bin").chmod(0o755)
    closed = d / "closed"
    closed.mkdir(mode=0o700)
    (closed / "ro").mkdir(mode=0o700)
    (closed / "ro" / "private.txt").write_text("root only")
    (closed / "ro" / "private.txt").chmod(0o600)
    (closed / "rw").mkdir(mode=0o700)
    yield d
    shutil.rmtree(d)


@needs_root
def test_host_files_keep_their_mode_owner_times_and_xattrs(server: Server, host_tree: Path) -> None:
    """chmod (the setuid bit), chown, utime and setxattr on a root-owned host file outside the
    lease get EPERM; inside a read-only lease EROFS. The leased 0700/0600 files are usable by
    the job's uid (read, and write where fs.write grants it) with no change to the host."""
    outside, ro, rw = host_tree / "outside.bin", host_tree / "closed" / "ro" / "private.txt", host_tree / "closed" / "rw"
    before = {p: os.stat(p) for p in (outside, ro, rw, host_tree / "closed")}
    lease = {"fs.read": [f"{host_tree / 'closed' / 'ro'}/**"], "fs.write": [f"{rw}/**"]}
    r = asyncio.run(_run(server.url, "hostfiles", {"outside": str(outside), "leased_ro": str(ro),
                                                    "leased_rw": str(rw)}, lease_request=lease))
    for call in ("chmod", "chown", "utime", "setxattr"):
        # user.* xattrs need write permission, which the file's mode refuses: EACCES
        assert r[f"{call}_outside"] == ("EACCES" if call == "setxattr" else "EPERM"), (call, r)
        assert r[f"{call}_leased_ro"] == "EROFS", (call, r)
    assert r["read_leased_ro"] == "ok" and r["write_leased_rw"] == "ok", r
    for p, st in before.items():
        now = os.stat(p)
        assert (now.st_mode, now.st_uid, now.st_gid) == (st.st_mode, st.st_uid, st.st_gid), p
        assert p == rw or now.st_mtime_ns == st.st_mtime_ns, p  # the job wrote into rw only
        assert not os.listxattr(p), p
    made = rw / "made-by-job.txt"
    assert made.read_text() == "hello"
    assert (made.stat().st_uid, made.stat().st_gid) == (0, 0), "a file the job made is stored as the lease owner's"
    assert not stat.S_IMODE(outside.stat().st_mode) & stat.S_ISUID
    assert not any(str(host_tree) in line for line in open("/proc/self/mountinfo")), "a mount leaked to the host"


@needs_root
def test_sysv_shared_memory_stays_in_its_worker(server: Server) -> None:
    """A 0600 segment made by one job is invisible to the next job (even one that would get
    its recycled uid) and is gone from the host when the worker ends."""
    r1 = asyncio.run(_run(server.url, "sysvshm", {"create": True}))
    assert r1["create"] == "ok", r1
    r2 = asyncio.run(_run(server.url, "sysvshm", {}))
    assert r2["find"] == "ENOENT" and r2["ipc_ns"] != r1["ipc_ns"], r2
    assert r1["ipc_ns"] != os.readlink("/proc/self/ns/ipc")
    with open("/proc/sysvipc/shm") as f:
        keys = [int(line.split()[0]) for line in f.read().splitlines()[1:]]
    assert 0x41524350 not in keys


def test_inotify_and_fanotify_are_refused(server: Server) -> None:
    r = asyncio.run(_run(server.url, "watchfiles", {}))
    assert r == {"inotify_init1": "EPERM", "inotify_init": "EPERM", "fanotify_init": "EPERM"}, r


@needs_root
def test_a_job_sees_and_takes_only_its_own_ports(server: Server) -> None:
    """Another job's egress port is not in this job's TCP table, and a job that takes ports
    by listen() without bind() takes them from its own namespace only."""
    from tests.sandbox.test_egress import Origin

    origin = Origin()
    try:
        async def go() -> None:
            async with sdk_session(server.url) as (client, rec):
                lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}
                holder = await client.submit(agent="tcptable", input={"autobind": 500}, lease_request=lease)
                held = (await asyncio.wait_for(holder.done, 30)).result
                assert held["held"] == 500, held
                # each job sees its own loopback only: its own proxy port, nothing of another's
                other = await client.submit(agent="tcptable", input={})
                seen = (await asyncio.wait_for(other.done, 30)).result
                assert seen["ports"] == [] and seen["net_ns"] != held["net_ns"], (seen, held)
                h = await client.submit(agent="fetch", input={"url": f"http://127.0.0.1:{origin.port}/x"},
                                        lease_request=lease)
                assert (await asyncio.wait_for(h.done, 30)).result["body"] == "hello from /x"
        asyncio.run(go())
    finally:
        origin.close()
