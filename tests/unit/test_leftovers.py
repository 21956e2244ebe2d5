"""What a killed supervisor left (cgroups, job dirs and their tmpfs mounts): one decision of
what is left behind (sandbox/leftovers.py), and per resource one removal, the same at close."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor.sandbox import leftovers
from supervisor.sandbox.cgroups import Cgroups
from supervisor.sandbox.job_dirs import JobDirs, can_mount_tmpfs, tmp_cap_here
from tests.unit.fake_cgroupfs import FakeCgroupFS


def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


needs_mount = pytest.mark.skipif(not can_mount_tmpfs(tempfile.gettempdir())[0],
                                 reason="this process may not mount a tmpfs (needs root or CAP_SYS_ADMIN)")


@pytest.fixture()
def shm() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="arcp-lo-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_left_behind_is_a_dead_supervisors_or_a_predecessor_with_our_pid(tmp_path: Path) -> None:
    dead = dead_pid()
    for name in (f"arcp-supervisor-{dead}", "arcp-supervisor-1", leftovers.own_name(), "arcp-supervisor-x1",
                 "arcp-job_1", f"other-{dead}"):
        (tmp_path / name).mkdir()
    assert leftovers.left_behind(str(tmp_path)) == sorted([str(tmp_path / f"arcp-supervisor-{dead}"),
                                                           str(tmp_path / leftovers.own_name())])
    assert leftovers.left_behind(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("v2", [False, True])
def test_a_dead_supervisors_groups_are_killed_and_removed_a_live_ones_kept(tmp_path: Path, v2: bool) -> None:
    fs = FakeCgroupFS(str(tmp_path), v2=v2)
    tops = [str(tmp_path)] if v2 else [str(tmp_path / c) for c in ("memory", "pids", "cpuacct")]
    dead, live = f"arcp-supervisor-{dead_pid()}", "arcp-supervisor-1"
    for top in tops:
        for name in (dead, live):
            fs.mkdir(os.path.join(top, name))
            fs.mkdir(os.path.join(top, name, "g1"))
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        procs = os.path.join(tops[0], dead, "g1", "cgroup.procs")
        fs.write(procs, f"{stray.pid}\n")
        cgs = Cgroups(str(tmp_path), fs)
        assert stray.wait(5) == -signal.SIGKILL  # killed through the group, as a worker's leftovers are
        # the fake keeps listing it, as the kernel does until it is gone: that group waits for the next start
        assert os.path.isdir(os.path.join(tops[0], dead, "g1"))
        fs.write(procs, "")
        Cgroups(str(tmp_path), fs).close()
        cgs.close()
        for top in tops:
            assert not os.path.exists(os.path.join(top, dead))
            assert os.path.isdir(os.path.join(top, live, "g1"))
            assert not os.path.exists(os.path.join(top, leftovers.own_name()))
    finally:
        stray.kill()
        stray.wait()


def test_close_kills_what_its_own_groups_hold_and_removes_them(tmp_path: Path) -> None:
    fs = FakeCgroupFS(str(tmp_path))
    cgs = Cgroups(str(tmp_path), fs)
    cg = cgs.reserve()
    assert cg is not None
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        fs.write(os.path.join(cg.dirs["pids"], "cgroup.procs"), f"{stray.pid}\n")
        cgs.close()
        assert stray.wait(5) == -signal.SIGKILL
        assert os.path.isdir(cg.dirs["pids"])  # still listed by the fake: left for the next start
        fs.write(os.path.join(cg.dirs["pids"], "cgroup.procs"), "")
        Cgroups(str(tmp_path), fs)  # this pid's tree, as a predecessor's
        assert not any(os.path.exists(d) for d in cg.dirs.values())
    finally:
        stray.kill()
        stray.wait()


@needs_mount
def test_a_dead_supervisors_job_dirs_lose_their_mounts_and_bind_mount(shm: str) -> None:
    root = os.path.join(shm, f"arcp-supervisor-{dead_pid()}")
    os.mkdir(root)
    assert subprocess.run(["mount", "--bind", root, root]).returncode == 0  # as a shared root is
    job = os.path.join(root, "arcp-w1")
    os.mkdir(job)
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", job]).returncode == 0
    dirs = JobDirs(shm)
    try:
        assert not _mounted(job) and not _mounted(root) and not os.path.exists(root)
    finally:
        dirs.close()
    assert not os.path.exists(dirs.root) and not _mounted(dirs.root)


@needs_mount
def test_doctors_tmpfs_probe_leaves_nothing(shm: str) -> None:
    assert tmp_cap_here(shm) == (True, "")
    assert os.listdir(shm) == []
    dirs = JobDirs(shm)  # a live one's root is probed in, and kept
    try:
        assert tmp_cap_here(shm) == (True, "") and os.listdir(dirs.root) == []
    finally:
        dirs.close()
