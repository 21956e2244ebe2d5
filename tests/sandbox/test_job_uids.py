"""Job uids (`[sandbox] job_uids`, else a default range): each worker runs as an
unprivileged uid of its own.

The interpreter on this host lives under /root (mode 0700): the fork server's
private mount view must make it reachable without changing the host's files.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.landlock import landlock_abi
from supervisor.sandbox.job_uids import UidPool
from tests.conftest import Server
from tests.interop.client import sdk_session
from tests.sandbox.test_attacks import escape_attempts, world  # noqa: F401  (fixture)

FIRST, LAST = 61000, 61063
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="job uids need a supervisor running as root")


def _free_range() -> bool:
    return not any(FIRST <= u.pw_uid <= LAST for u in pwd.getpwall())


@pytest.fixture(scope="module")
def uid_server() -> Iterator[Server]:
    if not _free_range():
        pytest.skip(f"uids {FIRST}-{LAST} belong to users here")
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(f'[sandbox]\njob_uids = "{FIRST}-{LAST}"\n')
    cfg.close()
    s = Server("--config", cfg.name)
    yield s
    s.stop()
    os.unlink(cfg.name)


async def _run(url: str, agent: str, input: Any, **kw: Any) -> dict[str, Any]:
    async with sdk_session(url) as (client, rec):
        h = await client.submit(agent=agent, input=input, **kw)
        return await rec.terminal(h.job_id, timeout=30)


@needs_root
def test_each_job_runs_as_its_own_uid_with_nothing_else(uid_server: Server) -> None:
    async def go() -> None:
        async with sdk_session(uid_server.url) as (client, rec):
            handles = [await client.submit(agent="status", input={"hold": 0.5}) for _ in range(3)]
            results = [(await asyncio.wait_for(h.done, 30)).result for h in handles]
            acc = next(f for f in rec.frames if f["type"] == "job.accepted")
            assert "job-uids" in acc["payload"]["x-vendor.arcp-supervisor.sandbox"]
            assert "shared-uid" not in acc["payload"]["x-vendor.arcp-supervisor.sandbox"]
        uids = set()
        for r in results:
            uid = r["uid"][0]
            assert r["uid"] == [uid] * 3 and r["gid"] == [uid] * 3 and r["groups"] == [], r
            assert FIRST <= uid <= LAST and r["home_owner"] == uid, r
            assert all(int(r[k], 16) == 0 for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb")), r
            assert r["NoNewPrivs"] == "1"
            uids.add(uid)
        assert len(uids) == 3, "concurrent jobs shared a uid"
    asyncio.run(go())


@needs_root
def test_leased_paths_are_usable_whatever_their_mode(uid_server: Server, tmp_path: Path) -> None:
    """A 0600 file and a root-owned 0755 directory under the lease are the job's to read and
    write (an idmapped mount in its worker), and the host's modes and owners are unchanged."""
    d = Path(tempfile.mkdtemp(prefix="arcp-uid-"))
    try:
        d.chmod(0o755)
        (d / "private.txt").write_text("root only")
        (d / "private.txt").chmod(0o600)
        (d / "public.txt").write_text("for all")
        (d / "public.txt").chmod(0o644)
        lease = {"fs.read": [f"{d}/**"], "fs.write": [f"{d}/**"]}

        async def go() -> None:
            t = await _run(uid_server.url, "readpath", {"path": str(d / "public.txt")}, lease_request=lease)
            assert t["payload"]["result"] == {"ok": True, "data": "for all"}
            t = await _run(uid_server.url, "readpath", {"path": str(d / "private.txt")}, lease_request=lease)
            assert t["payload"]["result"] == {"ok": True, "data": "root only"}, t
            t = await _run(uid_server.url, "writepath", {"path": str(d / "new.bin")}, lease_request=lease)
            assert "error" not in t["payload"]["result"], t
        asyncio.run(go())
        assert (d / "new.bin").exists() and (d / "new.bin").stat().st_uid == 0
        assert stat.S_IMODE((d / "private.txt").stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o755
    finally:
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


@needs_root
def test_the_host_keeps_its_modes(uid_server: Server) -> None:
    """The private view is the fork server's alone: /root is still 0700 on the host."""
    assert stat.S_IMODE(os.stat("/root").st_mode) == 0o700
    assert not any(" /root " in line for line in open("/proc/self/mountinfo"))


@needs_root
@pytest.mark.skipif(landlock_abi() < 6, reason="this kernel has no Landlock scopes")
def test_escape_attempts_fail_under_job_uids(uid_server: Server, world: Path) -> None:  # noqa: F811
    escape_attempts(uid_server, world)


def test_the_uid_pool_reuses_late_and_waits_when_empty() -> None:
    async def go() -> None:
        pool = UidPool(10, 12)
        got = [await pool.acquire() for _ in range(3)]
        assert got == [10, 11, 12] and pool.free == 0
        waiter = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0)  # the waiter runs up to its wait
        assert not waiter.done()
        pool.release(11)
        assert await asyncio.wait_for(waiter, 5) == 11
        pool.release(10)
        pool.release(12)
        assert [await pool.acquire(), await pool.acquire()] == [10, 12]
    asyncio.run(go())


@needs_root
@pytest.mark.skipif(landlock_abi() < 4, reason="the egress proxy needs Landlock ABI 4")
def test_net_fetch_works_under_job_uids(uid_server: Server) -> None:
    from tests.sandbox.test_egress import Origin

    origin = Origin()
    try:
        lease = {"net.fetch": [f"http://127.0.0.1:{origin.port}/**"]}
        t = asyncio.run(_run(uid_server.url, "fetch", {"url": f"http://127.0.0.1:{origin.port}/uid"},
                             lease_request=lease))
        assert t["payload"]["result"]["body"] == "hello from /uid", t
    finally:
        origin.close()


@needs_root
def test_two_supervisors_on_one_host_never_give_their_jobs_one_uid(make_server: type[Server]) -> None:
    """The attack: two supervisors on one host with one range (here, both on the default one),
    each running jobs at the same time. A job that shared a uid with another supervisor's job
    could reach that job's files and processes as their owner."""
    a, b = make_server(), make_server()

    async def on(url: str) -> list[int]:
        async with sdk_session(url) as (client, _):
            handles = [await client.submit(agent="status", input={"hold": 1.5}) for _ in range(4)]
            return [(await asyncio.wait_for(h.done, 30)).result["uid"][0] for h in handles]

    async def go() -> None:
        ua, ub = await asyncio.gather(on(a.url), on(b.url))
        assert len(set(ua)) == 4 and len(set(ub)) == 4
        assert not set(ua) & set(ub), f"jobs of two supervisors ran under the same uids: {set(ua) & set(ub)}"
    asyncio.run(go())
