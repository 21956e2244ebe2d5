"""supervisor/path_resolve.py: a job's fs.* targets resolved as the job would, off the loop."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sandbox import path_resolve, path_walk
from supervisor.sandbox.path_resolve import PathRefused, ResolverBusy, ResolveTimeout, resolve, resolve_as
from supervisor.sandbox.path_walk import walk

JOB_UID = 1_900_000_123  # no user has it (config.DEFAULT_JOB_UIDS)
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="resolving with a job's uid needs root")


@pytest.fixture()
def tree() -> Iterator[Path]:
    """granted/ (with links in and out), outside/secret, private/ (root's, 0700), proc links."""
    d = Path(tempfile.mkdtemp(prefix="arcp-resolve-"))
    d.chmod(0o755)
    for sub in ("granted", "granted/sub", "outside", "private"):
        (d / sub).mkdir()
        (d / sub).chmod(0o755)
    (d / "private").chmod(0o700)
    (d / "outside" / "secret").write_text("secret")
    (d / "granted" / "sub" / "file").write_text("x")
    (d / "granted" / "out").symlink_to(d / "outside" / "secret")
    (d / "granted" / "rel").symlink_to("../outside")
    (d / "granted" / "in").symlink_to("sub/file")
    (d / "granted" / "fd").symlink_to("/proc/self/fd/0")
    (d / "granted" / "devfd").symlink_to("/dev/fd")
    (d / "granted" / "loop").symlink_to("loop")
    (d / "private" / "link").symlink_to(d / "outside" / "secret")
    yield d
    shutil.rmtree(d)


def test_links_are_resolved_and_missing_tails_kept(tree: Path) -> None:
    g = tree / "granted"
    assert walk("/", f"{g}/sub/file") == f"{g}/sub/file"
    assert walk("/", f"{g}/out") == f"{tree}/outside/secret"
    assert walk("/", f"{g}/rel/secret") == f"{tree}/outside/secret"
    assert walk("/", f"{g}/in") == f"{g}/sub/file"
    assert walk("/", f"{g}/new/deeper/file") == f"{g}/new/deeper/file"  # to be made
    assert walk("/", f"{g}/sub/file/below") == f"{g}/sub/file/below"  # below a file: as written
    assert walk("/", "/") == "/"


def test_an_absolute_link_starts_again_from_the_given_root(tree: Path) -> None:
    """Resolved in a job's view (its root), an absolute link stays in that view."""
    (tree / "granted" / "abs").symlink_to("/outside/secret")
    assert walk(str(tree), "/granted/abs") == "/outside/secret"
    assert walk(str(tree), "/granted/rel/secret") == "/outside/secret"
    assert walk(str(tree), "/granted/../../../outside") == "/outside"


@pytest.mark.parametrize("target", ["/proc/1/fd/3", "/proc/self/root/etc/shadow", "/proc", "/proc/"])
def test_targets_under_proc_are_refused(target: str) -> None:
    with pytest.raises(PathRefused, match="/proc"):
        resolve_as(target.rstrip("/") or "/", None, None)


@pytest.mark.parametrize("name", ["fd", "devfd"])
def test_links_into_proc_are_refused_without_reading_them(tree: Path, name: str) -> None:
    with pytest.raises(PathRefused, match="/proc") as ei:
        resolve_as(f"{tree}/granted/{name}/3", None, None)
    assert "fd" not in str(ei.value) and str(tree) not in str(ei.value)


def test_link_loops_and_too_many_links_are_refused(tree: Path) -> None:
    with pytest.raises(PathRefused, match="40 symbolic links"):
        walk("/", f"{tree}/granted/loop")
    chain = tree / "granted"
    for i in range(45):
        (chain / f"c{i}").symlink_to(f"c{i + 1}")
    with pytest.raises(PathRefused, match="40 symbolic links"):
        walk("/", f"{chain}/c0")


def test_a_result_longer_than_path_max_is_refused(tree: Path) -> None:
    """Two short links into real directories 4200 bytes deep: the kernel would follow them,
    the lease check does not take a target longer than PATH_MAX."""
    name = "n" * 200
    fd = os.open(tree / "granted", os.O_PATH | os.O_DIRECTORY)
    try:
        for level in range(21):
            os.mkdir(name, dir_fd=fd)
            if level == 10:
                os.symlink("/".join([name] * 11), "b", dir_fd=fd)
            nxt = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
    finally:
        os.close(fd)
    (tree / "granted" / "a").symlink_to("/".join([name] * 10))
    assert walk("/", f"{tree}/granted/a") == f"{tree}/granted/" + "/".join([name] * 10)
    with pytest.raises(PathRefused, match="longer than 4095 bytes"):
        walk("/", f"{tree}/granted/a/b")


@needs_root
def test_the_jobs_uid_cannot_search_what_it_could_not(tree: Path) -> None:
    target = f"{tree}/private/link"
    assert resolve_as(target, None, None) == f"{tree}/outside/secret"  # root owns it: uid 0 may
    with pytest.raises(PathRefused, match="not searchable by the job") as ei:
        resolve_as(target, JOB_UID, None)
    assert "outside" not in str(ei.value) and "secret" not in str(ei.value)


@needs_root
def test_without_a_job_uid_the_supervisors_capabilities_are_dropped(tree: Path) -> None:
    """Jobs that run as the supervisor's uid 0 hold no capability: a directory of another
    user (0700) is not searchable for them, so not for their check either."""
    (tree / "others").mkdir(mode=0o700)
    (tree / "others" / "link").symlink_to(tree / "outside" / "secret")
    os.chown(tree / "others", 1_900_000_124, 1_900_000_124)
    with pytest.raises(PathRefused, match="not searchable"):
        resolve_as(f"{tree}/others/link", None, None)
    assert resolve_as(f"{tree}/others/link", 1_900_000_124, None) == f"{tree}/outside/secret"


@needs_root
def test_credentials_change_on_the_resolving_thread_only(tree: Path) -> None:
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with path_walk._as_job(JOB_UID):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(5)
        assert os.listdir(tree / "private") == ["link"]  # this thread still searches as root
        status = dict(line.split(":", 1) for line in open("/proc/thread-self/status"))
        assert status["Uid"].split()[3] == "0" and int(status["CapEff"], 16) != 0
    finally:
        release.set()
        t.join()


@needs_root
def test_the_job_view_is_the_workers_mount_namespace(tree: Path) -> None:
    """root_pid names a process whose root the walk starts from (here: our own)."""
    assert resolve_as(f"{tree}/granted/out", JOB_UID, os.getpid()) == f"{tree}/outside/secret"
    with pytest.raises(PathRefused, match="gone"):
        resolve_as(f"{tree}/granted/out", JOB_UID, 2 ** 22 + 12345)


def test_a_slow_resolution_times_out_and_the_loop_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()

    def slow(path: str, uid: int | None, root_pid: int | None) -> str:
        gate.wait(10)
        return path

    monkeypatch.setattr(path_resolve, "resolve_as", slow)

    async def go() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        start = time.monotonic()
        with pytest.raises(ResolveTimeout) as ei:
            await resolve("/x", uid=None, root_pid=None, timeout=0.3)
        # at its timeout, long before the thread's 10 s (and it is still running)
        assert 0.25 < time.monotonic() - start < 5.0
        assert not ei.value.pending.done()
        assert ticks >= 3  # the loop kept running meanwhile (a blocked one would not have ticked at all)
        gate.set()
        assert await asyncio.wait_for(ei.value.pending, 5) == "/x"
        t.cancel()
    asyncio.run(go())


def test_stuck_resolutions_hold_their_slots_and_others_wait_at_most_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    monkeypatch.setattr(path_resolve, "resolve_as", lambda p, u, r: (gate.wait(10), p)[1])
    monkeypatch.setattr(path_resolve, "MAX_THREADS", 2)

    async def go() -> None:
        stuck = [asyncio.ensure_future(resolve("/s", uid=None, root_pid=None, timeout=0.2)) for _ in range(2)]
        pending = []
        for s in stuck:
            with pytest.raises(ResolveTimeout) as ei:
                await s
            pending.append(ei.value.pending)
        start = time.monotonic()
        with pytest.raises(ResolverBusy):
            await resolve("/t", uid=None, root_pid=None, timeout=0.2)
        assert time.monotonic() - start < 5.0  # at its timeout, not when a stuck thread returns (10 s)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*pending), 10)  # their slots are given back as they return
        assert await resolve("/t", uid=None, root_pid=None, timeout=5) == "/t"
    asyncio.run(go())


def test_resolution_errors_reach_the_caller() -> None:
    async def go() -> None:
        with pytest.raises(PathRefused, match="/proc"):
            await resolve("/proc/self/environ", uid=None, root_pid=None)
    asyncio.run(go())


def test_resolver_threads_are_reused_and_a_tainted_one_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    def names() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "arcp-resolve"}

    async def go() -> None:
        before = names()
        for _ in range(50):
            await resolve("/tmp", uid=None, root_pid=None)
        assert len(names() - before) <= 1  # one at a time: at most one new thread, reused

        served: list[threading.Thread] = []

        def taint(path: str, uid: int | None, root_pid: int | None) -> str:
            served.append(threading.current_thread())
            path_walk.this_thread.tainted = True  # as when its credentials could not be restored
            return path

        monkeypatch.setattr(path_resolve, "resolve_as", taint)
        assert await resolve("/x", uid=None, root_pid=None) == "/x"
        served[0].join(5)
        assert not served[0].is_alive()  # the thread that served it is gone
        monkeypatch.undo()
        assert await resolve("/tmp", uid=None, root_pid=None) == "/tmp"
    asyncio.run(go())


@needs_root
def test_credentials_are_restored_after_each_resolution(tree: Path) -> None:
    """A reused thread goes back to the supervisor's credentials between jobs."""
    seen: list[tuple[str, str, str]] = []

    def creds_after(path: str, uid: int | None, root_pid: int | None) -> str:
        out = resolve_as(path, uid, root_pid)
        status = dict(line.split(":", 1) for line in open("/proc/thread-self/status"))
        seen.append((status["Uid"].split()[3], status["Gid"].split()[3], status["CapEff"].strip()))
        return out

    async def go() -> None:
        path_resolve.resolve_as, real = creds_after, path_resolve.resolve_as  # type: ignore[assignment]
        try:
            await resolve(f"{tree}/granted/out", uid=JOB_UID, root_pid=None)
            await resolve(f"{tree}/granted/out", uid=None, root_pid=None)
        finally:
            path_resolve.resolve_as = real  # type: ignore[assignment]
    asyncio.run(go())
    caps = open("/proc/self/status").read().split("CapEff:")[1].split()[0]
    assert seen == [("0", "0", caps), ("0", "0", caps)], seen
