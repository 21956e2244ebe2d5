"""Hostile agents against the sandbox: the kernel, not good manners, stops them."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import arcp
import pytest

from shared.landlock import landlock_abi
from shared.seccomp import seccomp_available
from tests.conftest import Server
from tests.interop.client import poll, sdk_session

needs_landlock = pytest.mark.skipif(landlock_abi() == 0, reason="this kernel has no Landlock")
needs_seccomp = pytest.mark.skipif(not seccomp_available(), reason="libseccomp is not available here")


async def _run(url: str, agent: str, input: Any, **kw: Any) -> tuple[Any, dict[str, Any]]:
    async with sdk_session(url) as (client, rec):
        h = await client.submit(agent=agent, input=input, **kw)
        term = await rec.terminal(h.job_id, timeout=30)
        return h, term


@pytest.fixture()
def outside(tmp_path: Path) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="arcp-sbx-"))
    d.chmod(0o777)  # only the sandbox, not file modes, may stop the agent
    (d / "secret.txt").write_text("top secret")
    yield d
    for p in d.rglob("*"):
        if p.is_file():
            p.unlink()
    for p in sorted(d.rglob("*"), reverse=True):
        p.rmdir()
    d.rmdir()


@needs_landlock
def test_reads_and_writes_outside_the_lease_are_refused(server: Server, outside: Path) -> None:
    async def go() -> None:
        secret = str(outside / "secret.txt")
        _, t = await _run(server.url, "readpath", {"path": secret})
        assert t["payload"]["result"]["ok"] is False and "Permission denied" in t["payload"]["result"]["error"]
        _, t = await _run(server.url, "readpath", {"path": secret}, lease_request={"fs.read": [f"{outside}/**"]})
        assert t["payload"]["result"] == {"ok": True, "data": "top secret"}
        out = outside / "out"
        out.mkdir()
        out.chmod(0o777)
        lease = {"fs.write": [f"{out}/**"]}
        _, t = await _run(server.url, "writepath", {"path": str(out / "a.bin")}, lease_request=lease)
        assert t["payload"]["result"] == {"ok": True} and (out / "a.bin").stat().st_size == 10
        for path in (outside / "evil.bin", out / "../evil2.bin", Path("/etc/arcp-evil")):
            _, t = await _run(server.url, "writepath", {"path": str(path)}, lease_request=lease)
            assert t["payload"]["result"]["ok"] is False, path
            assert not Path(os.path.normpath(path)).exists()
        _, t = await _run(server.url, "readpath", {"path": "/root/.bash_history"})
        assert t["payload"]["result"]["ok"] is False
    asyncio.run(go())


@needs_landlock
def test_private_tmp_and_no_network(server: Server) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    async def go() -> None:
        _, t = await _run(server.url, "tmpnet", {"port": port})
        r = t["payload"]["result"]
        assert r["home"] == r["tmp"] and os.path.basename(r["tmp"]).startswith("arcp-w")
        assert "connected" != r["net"] and "Permission denied" in r["net"], r
        assert r["udp"] != "sent" and "Permission denied" in r["udp"], r  # seccomp: TCP is the only IP socket
        assert r["interfaces"] == ["lo"], r

        async def removed() -> bool | None:
            return not os.path.exists(r["wrote"]) or None
        await poll(removed, "the private temp dir to go with its job")
    try:
        asyncio.run(go())
    finally:
        listener.close()


def test_open_files_limit_names_the_limit(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="openmany", input={"n": 500},
                                    lease_request={"x-vendor.arcp-supervisor.limits": ["max_open_files:64"]})
            with pytest.raises(arcp.InternalError):
                await asyncio.wait_for(h.done, 15)
            p = (await rec.terminal(h.job_id))["payload"]
            assert p["message"].startswith("open files limit 64 reached"), p
            assert p["retryable"] is False and p["details"] == {"limit": "max_open_files", "value": 64}
            assert h.accepted.lease["x-vendor.arcp-supervisor.limits"] == ["max_open_files:64"]
    asyncio.run(go())


def test_file_size_limit(server: Server, outside: Path) -> None:
    async def go() -> None:
        target = outside / "big.bin"
        _, t = await _run(server.url, "writepath", {"path": str(target), "size": 3 << 20, "raise": True},
                          lease_request={"fs.write": [f"{outside}/**"],
                                         "x-vendor.arcp-supervisor.limits": ["max_file_size_mb:1"]})
        p = t["payload"]
        assert t["type"] == "job.error" and p["message"].startswith("file size limit 1 MiB exceeded"), p
        assert target.stat().st_size <= 1 << 20
    asyncio.run(go())


def test_cpu_time_limit_is_a_timeout(server: Server) -> None:
    async def go() -> None:
        _, t = await _run(server.url, "spin", {},
                          lease_request={"x-vendor.arcp-supervisor.limits": ["cpu_sec:1"]})
        p = t["payload"]
        assert t["type"] == "job.error" and p["code"] == "TIMEOUT", p
        assert p["message"] == "cpu time limit 1 s exceeded" and p["retryable"] is False
    asyncio.run(go())


def test_memory_limit_kills_the_job_only(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            bystander = await client.submit(agent="sleep", input={"seconds": 1.5})
            h = await client.submit(agent="hog", input={"mb": 1024},
                                    lease_request={"x-vendor.arcp-supervisor.limits": ["memory_mb:128"]})
            p = (await rec.terminal(h.job_id, timeout=30))["payload"]
            assert p["code"] == "INTERNAL_ERROR" and p["message"] == "memory limit 128 MiB exceeded", p
            assert p["retryable"] is False
            assert (await asyncio.wait_for(bystander.done, 15)).result == {"slept": True}
    asyncio.run(go())


def test_accepted_lists_the_active_layers(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            h = await client.submit(agent="echo", input=1)
            extra = h.accepted.model_extra or {}
            layers = extra["x-vendor.arcp-supervisor.sandbox"]
            assert {"rlimits", "private-tmp", "no-new-privs", "memory-watchdog"} <= set(layers)
            if landlock_abi():
                assert f"landlock-abi{landlock_abi()}" in layers
    asyncio.run(go())


def test_a_reused_workers_next_job_finds_its_temp_dir_empty_and_writable() -> None:
    s = Server("--reuse-workers", "3")
    try:
        async def go() -> None:
            _, t1 = await _run(s.url, "tmpnet", {"port": 9})
            _, t2 = await _run(s.url, "tmpnet", {"port": 9})
            r1, r2 = t1["payload"]["result"], t2["payload"]["result"]
            assert r1["pid"] == r2["pid"] and r1["tmp"] == r2["tmp"], (r1, r2)  # the same worker
            assert r1["found"] == [] and r2["found"] == [], (r1, r2)  # the first job's file is gone
            assert os.path.isdir(r1["tmp"]) and os.listdir(r1["tmp"]) == []
        asyncio.run(go())
    finally:
        s.stop()


def test_jobs_hold_no_capabilities_and_no_new_privileges(server: Server) -> None:
    async def go() -> None:
        _, t = await _run(server.url, "status", {})
        r = t["payload"]["result"]
        assert r["NoNewPrivs"] == "1"
        for key in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            assert int(r[key], 16) == 0, r
    asyncio.run(go())


def _tasks_named(tag: str) -> set[int]:
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == tag:
                        found.add(int(pid))
            except OSError:
                continue
    return found


def _kill_all(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


async def _gone(tag: str, seconds: float) -> bool:
    for _ in range(int(seconds / 0.05)):
        if not _tasks_named(tag):
            return True
        await asyncio.sleep(0.05)
    return not _tasks_named(tag)


def test_fork_bomb_is_refused_by_the_pids_controller(server: Server) -> None:
    tag = "bomb" + os.urandom(4).hex()

    async def go() -> None:
        _, t = await _run(server.url, "forkbomb", {"n": 200, "tag": tag},
                          lease_request={"x-vendor.arcp-supervisor.limits": ["max_procs:16"]})
        p = t["payload"]
        assert t["type"] == "job.error" and p["message"].startswith("process limit 16 reached"), p
        assert p["details"] == {"limit": "max_procs", "value": 16}
        assert await _gone(tag, 15), "forked children outlived the job"
    try:
        asyncio.run(go())
    finally:
        _kill_all(_tasks_named(tag))


@needs_seccomp
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the agent uses x86_64 syscall numbers")
def test_seccomp_refuses_with_errors_not_kills(server: Server) -> None:
    import errno

    async def go() -> None:
        _, t = await _run(server.url, "syscalls", {})
        r = t["payload"]["result"]
        assert r.pop("threads_work") is True
        assert r.pop("clone3") == errno.ENOSYS
        assert r == {name: errno.EPERM for name in r}, r
        assert "seccomp" in (await _layers(server.url))
    asyncio.run(go())


async def _layers(url: str) -> list[str]:
    async with sdk_session(url) as (client, _):
        h = await client.submit(agent="echo", input=1)
        return list((h.accepted.model_extra or {})["x-vendor.arcp-supervisor.sandbox"])
