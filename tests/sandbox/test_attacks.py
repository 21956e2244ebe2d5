"""The attacker's list of the sandbox issue: every attempt fails, and the supervisor and a
concurrent job are unaffected."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import arcp
import pytest

from tests.conftest import Server
from tests.interop.client import poll, sdk_session
from tests.sandbox.test_sandbox import _gone, _kill_all, _tasks_named


@pytest.fixture()
def world() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="arcp-atk-"))
    d.chmod(0o777)
    (d / "outside").mkdir(mode=0o777)
    (d / "outside" / "secret.txt").write_text("secret")
    (d / "granted").mkdir(mode=0o777)
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        if p.is_dir() and not p.is_symlink():
            p.rmdir()
        else:
            p.unlink()
    d.rmdir()


def test_escape_attempts_fail_and_others_go_on(server: Server, world: Path) -> None:
    escape_attempts(server, world)


def escape_attempts(server: Server, world: Path) -> None:
    """The attacker's list, run against `server`; also run in job uid mode (test_job_uids)."""
    sock_path = str(world / "host.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(1)

    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            other = await client.submit(agent="stubborn")
            ev = await rec.wait_for(lambda f: f.get("job_id") == other.job_id and f.get("type") == "job.event")
            other_pid = int(ev["payload"]["body"]["message"].split()[1])
            h = await client.submit(agent="attacks", lease_request={"fs.write": [f"{world / 'granted'}/**"]},
                                    input={"granted": str(world / "granted"), "outside": str(world / "outside"),
                                           "supervisor": server.pid, "other": other_pid, "unix": sock_path})
            r: dict[str, Any] = (await asyncio.wait_for(h.done, 15)).result
            fds = r.pop("fds")
            r.pop("ignores")
            assert [k for k, v in r.items() if v == "ok"] == [], r
            # seccomp, not a missing terminal, refuses the injection (ENOTTY without the filter)
            assert r["tiocsti"] == r["tiocsti_high_bits"] == r["tioclinux"] == "EPERM", r
            assert r["open_tty"] in ("EACCES", "ENXIO") and r["openpty"] == "EACCES", r
            # the setuid copy runs (the temp dir is not noexec) but gains nothing: nosuid, no_new_privs
            assert r["setuid_copy"].count("Operation not permitted") == 2, r
            assert "Permission denied" in r["setuid_copy"].split("read:")[1], r
            # nothing inherited from the supervisor: /dev/null, pipes, the worker's own unix
            # socket pair and event loop; no file, no TCP socket
            assert set(fds.split(",")) <= {"/dev/null", "pipe", "anon_inode", "socket:AF_UNIX"}, fds
            # the concurrent job and the supervisor are fine
            assert os.path.exists(f"/proc/{other_pid}") and os.path.exists(f"/proc/{server.pid}")
            await client.cancel_job(other.job_id)
            await rec.terminal(other.job_id)
            h2 = await client.submit(agent="echo", input="after")
            assert (await asyncio.wait_for(h2.done, 15)).result == {"echo": "after"}
    try:
        asyncio.run(go())
    finally:
        listener.close()


def test_filling_the_temp_dir_stops_at_its_cap(server: Server) -> None:
    """A tmpfs of the job's own: ENOSPC at the cap (half the job's memory, 64 MiB here), named
    in the error if the agent lets it out; /dev/shm, other jobs and the supervisor go on."""
    limits = {"x-vendor.arcp-supervisor.limits": ["memory_mb:128"]}

    async def go() -> None:
        shm_before = shutil.disk_usage("/dev/shm").used
        async with sdk_session(server.url) as (client, rec):
            other = await client.submit(agent="stubborn")
            h = await client.submit(agent="filldisk", input={}, lease_request=limits)
            r = (await asyncio.wait_for(h.done, 30)).result
            assert r["error"] == "ENOSPC" and 56 <= r["written_mb"] <= 64, r
            h = await client.submit(agent="filldisk", input={"raise": True}, lease_request=limits)
            t = await rec.terminal(h.job_id)
            err = t["payload"]
            assert t["type"] == "job.error" and err["code"] == "INTERNAL_ERROR", t
            assert err["message"].startswith("temp dir limit 64 MiB reached"), err
            assert err["retryable"] is False and err["details"]["limit"] == "tmp_size_mb", err
            async def shm_freed() -> bool | None:
                return shutil.disk_usage("/dev/shm").used - shm_before < 16 << 20 or None
            await poll(shm_freed, "the job's files to leave /dev/shm with it")
            # the concurrent job is still running: no terminal of it yet, and it ends as cancelled
            assert not [f for f in rec.frames if f.get("job_id") == other.job_id
                        and f.get("type") in ("job.result", "job.error")], "the other job ended"
            await client.cancel_job(other.job_id)
            t = await rec.terminal(other.job_id)
            assert t["payload"].get("code") == "CANCELLED" or "cancel" in str(t["payload"]).lower(), t
            h2 = await client.submit(agent="echo", input="after")
            assert (await asyncio.wait_for(h2.done, 15)).result == {"echo": "after"}
    asyncio.run(go())


@pytest.mark.parametrize("end", ["return", "cancel", "timeout"])
def test_no_grandchild_survives_the_job(server: Server, end: str) -> None:
    tag = "gc" + os.urandom(5).hex()

    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            kw: dict[str, Any] = {"max_runtime_sec": 1} if end == "timeout" else {}
            h = await client.submit(agent="grandchild", input={"tag": tag, "then": "return" if end == "return"
                                                               else "sleep"}, **kw)
            await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event")
            if end == "cancel":
                await client.cancel_job(h.job_id)
            await rec.terminal(h.job_id, timeout=10)
            assert await _gone(tag, 15), f"a setsid() grandchild outlived its job ({end})"
    try:
        asyncio.run(go())
    finally:
        _kill_all(_tasks_named(tag))


@pytest.mark.parametrize("limits, key", [
    (["memory_mb:0"], "memory_mb"), (["cpu_sec:-1"], "cpu_sec"), (["max_procs:lots"], "max_procs"),
    (["max_open_files:1.5"], "max_open_files"), (["bogus:1"], "bogus"), (["no-colon"], "no-colon"),
])
def test_bad_limit_requests_name_the_key(server: Server, limits: list[str], key: str) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            with pytest.raises(arcp.ARCPError) as ei:
                await client.submit(agent="echo", lease_request={"x-vendor.arcp-supervisor.limits": limits})
            assert ei.value.code == "INVALID_REQUEST" and key in ei.value.message, ei.value.message
    asyncio.run(go())


def test_the_workers_own_threads_are_sandboxed_too(server: Server, world: Path) -> None:
    """The attack: the agent gets the worker's pipe-reader thread, started before the job's
    sandbox, to run its code (it replaces the method that thread calls for each frame from the
    supervisor), and tries there what the sandbox refuses. The thread must be as confined as
    the agent's own: Landlock and both seccomp filters on every thread of the worker."""
    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            h = await client.submit(agent="readerthread", input={"path": str(world / "outside" / "secret.txt")})
            r: dict[str, Any] = (await asyncio.wait_for(h.done, 15)).result
            assert r["main"]["read"] == "PermissionError" and r["main"]["unix"] == "PermissionError", r
            assert r["reader"] is not None and r["reader"]["thread"] == "arcp-pipe", r
            assert r["reader"]["read"] == "PermissionError", f"the reader thread read outside the lease: {r}"
            assert r["reader"]["unix"] == "PermissionError", f"the reader thread made an AF_UNIX socket: {r}"
    asyncio.run(go())
