"""Jobs end to end with the official SDK client: results, events, errors, cancel, streams."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator

import arcp
import psutil
import pytest

from tests.conftest import Server
from tests.interop.client import sdk_session


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_result_events_and_seq(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="logs", input={"n": 50})
            r = await asyncio.wait_for(h.done, 15)
            assert r.result == {"n": 50}
            logs = [f["payload"]["body"]["message"] for f in rec.frames
                    if f.get("type") == "job.event" and f["job_id"] == h.job_id]
            assert logs == [f"log {i}" for i in range(50)]
            seqs = [f["event_seq"] for f in rec.frames if "event_seq" in f]
            assert seqs == list(range(1, len(seqs) + 1))
            assert rec.frames[-1]["type"] == "job.result"
    run(go())


def test_sync_and_versioned_agents(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            h = await client.submit(agent="echo@2.0.0", input=[1, 2])
            assert (await asyncio.wait_for(h.done, 15)).result == {"echo": [1, 2], "sync": True}
            h = await client.submit(agent="echo", input="d")
            assert h.accepted.agent == "echo@1.0.0"
    run(go())


def test_agent_output_becomes_log_events_before_the_result(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="printer")
            term = await rec.terminal(h.job_id)
            logs = [(f["payload"]["body"]["level"], f["payload"]["body"]["message"]) for f in rec.frames
                    if f.get("type") == "job.event" and f["payload"]["kind"] == "log"]
            assert ("info", "to stdout") in logs and ("warn", "to stderr") in logs
            assert term["type"] == "job.result"
    run(go())


def test_agent_errors_keep_code_and_hide_traceback(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="raises", input={"message": "kaput"})
            with pytest.raises(arcp.InternalError):
                await asyncio.wait_for(h.done, 15)
            term = await rec.terminal(h.job_id)
            assert term["payload"]["message"] == "ValueError: kaput"
            assert "Traceback" not in str(term)
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="denies")
            with pytest.raises(arcp.PermissionDeniedError):
                await asyncio.wait_for(h.done, 15)
            term = await rec.terminal(h.job_id)
            assert term["payload"]["details"] == {"why": "test"}
            assert term["payload"]["retryable"] is False
    run(go())


LONG_GRACE = 30.0


@pytest.fixture(scope="module")
def long_grace() -> Iterator[Server]:
    """A server whose stop grace is long: a cancel that is not cooperative shows by its time."""
    s = Server("--grace", str(LONG_GRACE))
    yield s
    s.stop()


@pytest.mark.parametrize("agent", ["busy", "sleep"])
def test_cancel_interrupts_python_code(long_grace: Server, agent: str) -> None:
    """Cancel reaches a spinning sync agent and a sleeping async one well within the grace."""
    async def go() -> None:
        async with sdk_session(long_grace.url) as (client, rec):
            h = await client.submit(agent=agent, input={"seconds": 60})
            await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event")
            t0 = time.monotonic()
            await client.cancel_job(h.job_id, reason="stop it")
            term = await rec.terminal(h.job_id, timeout=LONG_GRACE + 10)
            took = time.monotonic() - t0
            assert term["type"] == "job.error" and term["payload"]["code"] == "CANCELLED"
            assert term["payload"]["final_status"] == "error"  # Python flavour
            assert any(f.get("type") == "job.cancelled" for f in rec.frames)
            assert took < LONG_GRACE / 3, f"cooperative cancel took {took:.2f}s (grace is {LONG_GRACE:g} s)"
    run(go())


def test_cancel_kills_a_job_that_ignores_it_after_grace(make_server: type[Server]) -> None:
    srv = make_server("--grace", "0.5")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            h = await client.submit(agent="stubborn")
            ev = await rec.wait_for(lambda f: f.get("job_id") == h.job_id and f.get("type") == "job.event")
            pid = int(ev["payload"]["body"]["message"].split()[1])
            assert psutil.pid_exists(pid)
            t0 = time.monotonic()
            await client.cancel_job(h.job_id)
            term = await rec.terminal(h.job_id, timeout=15)
            took = time.monotonic() - t0
            assert term["payload"]["code"] == "CANCELLED"
            # not before the grace; the kill follows within 0.5 s of it, given a few more
            # seconds here for a loaded host (the job itself would never end)
            assert 0.4 <= took <= 0.5 + 0.5 + 3, f"terminal after {took:.2f}s, grace 0.5 s"
            assert not psutil.pid_exists(pid), "the worker outlived its terminal frame"
    run(go())


def test_timeout(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="sleep", input={"seconds": 30}, max_runtime_sec=1)
            with pytest.raises(arcp.TimeoutError):
                await asyncio.wait_for(h.done, 20)
            term = await rec.terminal(h.job_id)
            assert term["payload"]["code"] == "TIMEOUT" and term["payload"]["retryable"] is False
    run(go())


def test_streamed_result_is_byte_exact(server: Server) -> None:
    size = 3 * 1024 * 1024 + 17

    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="stream", input={"size": size})
            data = await asyncio.wait_for(h.collect_chunks(), 30)
            r = await asyncio.wait_for(h.done, 15)
            assert r.result_size == size and data == (bytes(range(256)) * (size // 256 + 1))[:size]
            chunks = [f["payload"]["body"] for f in rec.frames
                      if f.get("type") == "job.event" and f["payload"]["kind"] == "result_chunk"]
            assert [c["chunk_seq"] for c in chunks] == list(range(len(chunks)))
            assert {c["encoding"] for c in chunks} == {"base64"}
            assert b"".join(base64.b64decode(c["data"]) for c in chunks) == data
    run(go())


def test_text_that_escapes_badly_is_cut_below_the_frame_cap(server: Server) -> None:
    text = "\x01" * 400_000  # each character is six bytes of JSON

    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            h = await client.submit(agent="streamtext", input={"text": text})
            data = await asyncio.wait_for(h.collect_chunks(), 30)
            await asyncio.wait_for(h.done, 15)
            assert data.decode() == text
    run(go())


def test_inline_result_too_big_for_a_frame(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, rec):
            h = await client.submit(agent="bigresult", input={"size": 2 * 1024 * 1024})
            with pytest.raises(arcp.InternalError):
                await asyncio.wait_for(h.done, 15)
            term = await rec.terminal(h.job_id)
            assert "stream_result" in term["payload"]["message"]
    run(go())


def test_worker_environment_is_scrubbed(server: Server) -> None:
    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            h = await client.submit(agent="identity", lease_request={"fs.read": ["/data/**"]})
            r = (await asyncio.wait_for(h.done, 15)).result
            assert r["job_id"] == h.job_id and r["agent"] == "identity@0.0.0"
            assert r["lease"] == {"fs.read": ["/data/**"]}
            allowed = {"PATH", "LANG", "TZ", "PYTHONDONTWRITEBYTECODE", "HOME", "TMPDIR"}
            assert all(k in allowed or k.startswith("LC_") for k in r["env"]), r["env"]
            assert r["pid"] != server.pid
    run(go())


def test_validate_lease_op_resolves_symlinks_in_the_supervisor(server: Server, tmp_path: object) -> None:
    import os
    import pathlib

    base = pathlib.Path(str(tmp_path))
    granted = base / "granted"
    granted.mkdir()
    (granted / "ok.txt").write_text("x")
    os.symlink("/etc", granted / "link")

    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            h = await client.submit(agent="leaseops", lease_request={"fs.read": [f"{granted}/**"]}, input={"ops": [
                ["fs.read", f"{granted}/ok.txt"],
                ["fs.read", f"{granted}/link/passwd"],          # a symlink out of the grant
                ["fs.read", f"{granted}/../granted/ok.txt"],    # '..' that stays inside
                ["fs.read", f"{granted}/../../etc/passwd"],     # '..' that leaves
                ["fs.read", "relative/path"],
                ["fs.write", f"{granted}/ok.txt"],
            ]})
            r = (await asyncio.wait_for(h.done, 15)).result
            assert r == ["allowed", "PERMISSION_DENIED", "allowed", "PERMISSION_DENIED", "PERMISSION_DENIED",
                         "PERMISSION_DENIED"], r
    asyncio.run(go())


def test_streamed_result_over_the_cap_fails_the_write(make_server: type[Server]) -> None:
    srv = make_server("--max-result-bytes", "1M", "--chunk-size", "64K")

    async def go() -> None:
        async with sdk_session(srv.url) as (client, rec):
            h = await client.submit(agent="stream", input={"size": 2 * 1024 * 1024})
            with pytest.raises(arcp.InternalError):
                await asyncio.wait_for(h.done, 15)
            term = await rec.terminal(h.job_id)
            assert "streamed result exceeds 1048576 bytes" in term["payload"]["message"], term
            chunks = [f for f in rec.frames if f.get("job_id") == h.job_id and f.get("type") == "job.event"
                      and f["payload"]["kind"] == "result_chunk"]
            assert not chunks, "nothing of a refused write is sent"
    asyncio.run(go())


def test_many_concurrent_jobs_all_get_a_worker(server: Server) -> None:
    """A burst of submits must wait for workers, never fail for want of one."""
    async def go() -> None:
        async with sdk_session(server.url) as (client, _):
            handles = await asyncio.gather(*(client.submit(agent="sleep", input={"seconds": 0.5})
                                             for _ in range(400)))
            results = await asyncio.wait_for(asyncio.gather(*(h.done for h in handles)), 60)
            assert all(r.result == {"slept": True} for r in results)
    asyncio.run(go())
