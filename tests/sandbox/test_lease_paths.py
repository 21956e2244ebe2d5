"""validate_lease_op on paths, as a hostile job uses it: the supervisor resolves as the job
would, names only what the job sent, and never stalls the sessions of others."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from tests.conftest import Server
from tests.interop.client import sdk_session
from tests.sandbox.test_attacks import world  # noqa: F401  (fixture)


def _supervisor_fds(pid: int) -> dict[int, str]:
    """What the supervisor's descriptors point at (read by the test, as root)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


async def _probe(url: str, input: dict[str, Any], lease: dict[str, list[str]]) -> dict[str, Any]:
    async with sdk_session(url) as (client, rec):
        h = await client.submit(agent="leaseprobe", input=input, lease_request=lease)
        t = await rec.terminal(h.job_id, timeout=30)
        assert t["type"] == "job.result", t
        return dict(t["payload"]["result"])


def test_proc_magic_links_and_links_out_are_refused_without_naming_their_targets(
        server: Server, world: Path) -> None:  # noqa: F811
    granted, outside = world / "granted", world / "outside"
    (granted / "file.txt").write_text("in")
    fds = _supervisor_fds(server.pid)
    files = [t for t in fds.values() if t.startswith("/")]
    assert files, fds  # the supervisor holds files open (its store, its log, /dev/null)
    proc_targets = [f"/proc/{server.pid}/fd/{n}" for n in sorted(fds)[:24]]
    proc_targets += [f"/proc/{server.pid}/root/etc/passwd", f"/proc/{server.pid}/cwd", "/proc/self/fd/3",
                     "/dev/fd/3", "{tmp}/to_proc/1"]
    ops = [["fs.read", str(granted / "file.txt")], ["fs.read", str(granted / "not-yet.txt")],
           ["fs.read", str(granted / "out")], ["fs.read", "{tmp}/secret_link"],
           ["fs.read", str(granted / "sub" / ".." / "out")]]
    ops += [["fs.read", t] for t in proc_targets]
    lease = {"fs.read": [f"{granted}/**"], "fs.write": [f"{granted}/**"]}
    r = asyncio.run(_probe(server.url, {
        "links": {str(granted / "out"): str(outside / "secret.txt"),
                  "{tmp}/secret_link": str(outside / "secret.txt"),
                  "{tmp}/to_proc": f"/proc/{server.pid}/fd"},
        "ops": ops}, lease))
    results = r["results"]
    assert results[0] == ["allowed", ""] and results[1] == ["allowed", ""], results
    for (cap, target), (code, message) in zip(ops[2:], results[2:], strict=True):
        assert code == "PERMISSION_DENIED", (target, code, message)
        asked = target.replace("{tmp}", r["tmp"])
        assert repr(asked) in message, (asked, message)  # named as sent ...
        assert "secret" not in message.replace(asked, ""), message  # ... never as resolved
        assert "outside" not in message.replace(asked, ""), message
        for f in files:
            assert f not in message.replace(asked, ""), (f, message)


def test_a_link_made_in_the_jobs_own_temp_dir_is_resolved_and_judged(server: Server, world: Path) -> None:  # noqa: F811
    """The job's temp dir is its own: a link there to a granted file is allowed, to a secret not."""
    granted, outside = world / "granted", world / "outside"
    (granted / "ok.txt").write_text("x")
    lease = {"fs.read": [f"{granted}/**"]}
    r = asyncio.run(_probe(server.url, {
        "links": {"{tmp}/good": str(granted / "ok.txt"), "{tmp}/bad": str(outside / "secret.txt")},
        "ops": [["fs.read", "{tmp}/good"], ["fs.read", "{tmp}/bad"], ["fs.read", "relative"]]}, lease))
    codes = [c for c, _ in r["results"]]
    assert codes == ["allowed", "PERMISSION_DENIED", "PERMISSION_DENIED"], r


def test_oversized_arguments_are_refused_naming_the_bound(server: Server) -> None:
    r = asyncio.run(_probe(server.url, {"ops": [
        ["fs.read", "/" + "a/" * 300000], ["fs.read", "/tmp/" + "n" * 256],
        ["net.fetch", "https://x/" + "p" * 9000], ["x-vendor.a." + "b" * 300, "t"]]},
        {"fs.read": ["/**"]}))
    codes = [c for c, _ in r["results"]]
    messages = [m for _, m in r["results"]]
    assert codes == ["INVALID_REQUEST"] * 4, r
    assert "PATH_MAX 4096" in messages[0] and "NAME_MAX" in messages[1], messages
    assert "8192 bytes" in messages[2] and "256 bytes" in messages[3], messages
    assert all(len(m) < 300 for m in messages), messages


def test_a_job_spamming_path_checks_stalls_no_other_session(server: Server) -> None:
    """While one job sends 600 KB paths, link chains and /proc links, many in flight, another
    session's job runs to its end before the spam does."""
    async def go() -> None:
        async with sdk_session(server.url) as (c1, rec1), sdk_session(server.url) as (c2, _):
            spam = await c1.submit(agent="leasespam", input={"rounds": 25}, lease_request={"fs.read": ["/**"]})
            await rec1.wait_for(lambda f: f.get("job_id") == spam.job_id and f.get("type") == "job.event"
                                and f["payload"]["body"].get("phase") == "spamming", timeout=15)
            for i in range(3):
                h = await c2.submit(agent="echo", input=i)
                assert (await asyncio.wait_for(h.done, 15)).result == {"echo": i}
                # in order, not in seconds (a loaded host slows both): it did not wait for the spam
                assert not [f for f in rec1.frames if f.get("job_id") == spam.job_id
                            and f.get("type") in ("job.result", "job.error")], f"echo {i} ended only after the spam"
            counts = (await asyncio.wait_for(spam.done, 60)).result
            assert counts.get("INVALID_REQUEST", 0) == 2 * 25, counts
            assert counts.get("PERMISSION_DENIED", 0) >= 35 * 25, counts  # link chains, /proc
            assert "INTERNAL_ERROR" not in counts, counts
    asyncio.run(go())
