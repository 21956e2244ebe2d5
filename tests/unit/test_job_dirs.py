"""Each job's temp dir: a capped tmpfs where mounts work, removed at the end; stale ones cleaned."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest

from supervisor.sandbox.job_dirs import PREFIX, JobDirs, can_mount_tmpfs


@pytest.fixture()
def base() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="arcp-jd-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield d
    shutil.rmtree(d, ignore_errors=True)


needs_mount = pytest.mark.skipif(not can_mount_tmpfs(tempfile.gettempdir())[0],
                                 reason="this process may not mount a tmpfs (needs root or CAP_SYS_ADMIN)")


def _mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@needs_mount
def test_a_job_dir_is_a_capped_tmpfs_removed_at_the_end(base: str) -> None:
    dirs = JobDirs(base, size=4 << 20)
    try:
        path, capped = dirs.create("job_X", 2 << 20)
        assert capped and _mounted(path) and os.stat(path).st_mode & 0o777 == 0o700
        with pytest.raises(OSError) as e:
            with open(os.path.join(path, "big"), "wb") as f:
                for _ in range(3):
                    f.write(b"\0" * (1 << 20))
                    f.flush()
        assert e.value.errno == errno.ENOSPC
        dirs.remove(path, capped)
        assert not os.path.exists(path) and not _mounted(path)
    finally:
        dirs.close()
    assert not os.path.exists(dirs.root)


@needs_mount
def test_a_removal_after_the_close_says_nothing(base: str, caplog: pytest.LogCaptureFixture) -> None:
    """A worker's dir removed after the runtime's end unmounted everything (a warm worker's
    removal runs late) finds nothing left to do, and is no warning."""
    dirs = JobDirs(base, size=4 << 20)
    path, capped = dirs.create("w1", 2 << 20)
    dirs.close()
    with caplog.at_level("WARNING", logger="arcp"):
        dirs.remove(path, capped)
    assert not os.path.exists(path)
    assert not [r for r in caplog.records if "unmount" in r.getMessage()], caplog.text


@needs_mount
def test_a_dead_supervisors_dirs_are_cleaned_and_a_live_ones_kept(base: str) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_root = os.path.join(base, f"{PREFIX}{int(dead.stdout)}")
    os.mkdir(dead_root)
    left = os.path.join(dead_root, "arcp-job_old")
    os.mkdir(left)
    assert subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", left]).returncode == 0
    live_root = os.path.join(base, f"{PREFIX}1")  # pid 1 is alive
    os.mkdir(live_root)
    dirs = JobDirs(base)
    try:
        assert not os.path.exists(dead_root) and not _mounted(left)
        assert os.path.isdir(live_root)
    finally:
        dirs.close()
