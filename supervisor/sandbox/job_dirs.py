"""Each job's private temporary directory (its HOME and TMPDIR): size-capped, emptied at its end.

Where the supervisor may mount (root, or CAP_SYS_ADMIN), each worker's directory
is a tmpfs of its own, capped in bytes and inodes, so a job that fills it gets
ENOSPC and nothing else on the host notices: not /dev/shm, not another job. It
is made when the worker is forked (off a job's critical path: mounting and
unmounting cost about 110 µs), emptied after each job the worker runs, and
unmounted and removed when the worker goes. Elsewhere it is a plain
directory on a tmpfs (bounded only by the job's memory cgroup, since tmpfs
pages are charged to the writer), and `doctor` and the job's sandbox list say so.

All of one supervisor's directories live under `<base>/arcp-supervisor-<pid>`,
so a supervisor that was killed leaves nothing another one cannot clean up
(sandbox/leftovers.py): `remove_root` removes such a tree, at close and at the next start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile

from supervisor.sandbox.leftovers import PREFIX, left_behind, own_name

log = logging.getLogger("arcp.jobs")

MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_SHARED = 0x2, 0x4, 0x20, 0x1000, 1 << 20
MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def tmp_base() -> str:
    """A tmpfs when there is one (a directory there costs microseconds, on a disk tens)."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


def _mount_tmpfs(path: str, size: int) -> None:
    inodes = max(1024, min(size // 4096, 1 << 20))
    opts = f"size={size},nr_inodes={inodes},mode=0700".encode()
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {path}: {os.strerror(err)}")


def _unmount(path: str) -> bool:
    return bool(_libc.umount2(path.encode(), MNT_DETACH) == 0)


def _mounts_at_or_under(root: str) -> list[str]:
    """Mount points at `root` or below it, deepest first."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point == root or point.startswith(root + "/"):
                    out.append(point)
    except OSError:
        pass
    return sorted(out, key=len, reverse=True)


def remove_root(root: str) -> None:
    """Unmount everything at or under a supervisor's root (the job dirs' tmpfs mounts, its own
    shared bind mount) and remove it: the same for this supervisor's at close and for what a
    killed one left."""
    for point in _mounts_at_or_under(root):
        _unmount(point)
    shutil.rmtree(root, ignore_errors=True)


def can_mount_tmpfs(where: str) -> tuple[bool, str]:
    """Can this process mount a tmpfs (under `where`)? And if not, why."""
    probe = tempfile.mkdtemp(prefix="arcp-probe-", dir=where)
    try:
        _mount_tmpfs(probe, 1 << 20)
    except OSError as e:
        return False, f"cannot mount a tmpfs: {e.strerror}"
    else:
        _unmount(probe)
        return True, ""
    finally:
        os.rmdir(probe)


def tmp_cap_here(base: str | None = None) -> tuple[bool, str]:
    """Would `JobDirs(base)` cap its directories? Probed where it mounts them: under this
    process's own root, which is removed after (and, should this process die in between, by
    the next supervisor to start, as any root left behind)."""
    root = os.path.join(base or tmp_base(), own_name())
    made = not os.path.exists(root)
    try:
        os.makedirs(root, 0o711, exist_ok=True)
    except OSError as e:
        return False, f"cannot make {root}: {e.strerror}"
    try:
        return can_mount_tmpfs(root)
    finally:
        if made:
            remove_root(root)


class JobDirs:
    def __init__(self, base: str | None = None, size: int = 256 << 20, shared: bool = False) -> None:
        """`shared`: the root becomes a shared mount, so that the per-job mounts made here
        also appear in the workers' own mount namespace (job uids on)."""
        self.base = base or tmp_base()
        self.size = size
        self.root = os.path.join(self.base, own_name())
        for left in left_behind(self.base):  # by supervisors that are gone
            remove_root(left)
        os.makedirs(self.root, 0o711, exist_ok=True)
        os.chmod(self.root, 0o711)  # job uids reach their own directory, and list none
        self.shared = shared and self._share()
        self.capped, self.why_not = self._probe()
        if not self.capped:
            log.warning("job temp dirs are not size-capped (%s); the job's memory cgroup bounds them", self.why_not)

    def _share(self) -> bool:
        root = self.root.encode()
        if _libc.mount(root, root, None, MS_BIND, None) != 0 or _libc.mount(b"none", root, None, MS_SHARED, None) != 0:
            log.warning("job temp dirs: cannot make %s a shared mount: %s", self.root,
                        os.strerror(ctypes.get_errno()))
            return False
        return True

    def _probe(self) -> tuple[bool, str]:
        return can_mount_tmpfs(self.root)

    def create(self, name: str, size: int) -> tuple[str, bool]:
        """A private directory, mode 0700, and whether it is capped at `size` bytes (a mount
        that fails here, where mounts work, is logged and the directory stays plain)."""
        path = os.path.join(self.root, f"arcp-{name}")
        os.mkdir(path, 0o700)
        if not self.capped:
            return path, False
        try:
            _mount_tmpfs(path, size)
        except OSError as e:
            log.error("%s is not size-capped: %s", path, e)
            return path, False
        return path, True

    def resize(self, path: str, size: int) -> bool:
        """A new cap for a mounted directory (a job whose memory limit makes it smaller)."""
        inodes = max(1024, min(size // 4096, 1 << 20))
        opts = f"size={size},nr_inodes={inodes}".encode()
        if _libc.mount(b"tmpfs", path.encode(), None, MS_REMOUNT | MS_NOSUID | MS_NODEV, opts) != 0:
            log.error("cannot resize %s to %d bytes: %s", path, size, os.strerror(ctypes.get_errno()))
            return False
        return True

    @staticmethod
    def empty(path: str) -> None:
        """Remove everything inside (the next job of the same worker starts with nothing)."""
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)

    def remove(self, path: str, capped: bool) -> None:
        """Unmount (lazily: a dying process may still hold it) and remove. A directory that is
        gone, or no longer a mount point, was removed already (by `close()`, which unmounts
        everything under the root at the runtime's end, before the workers' own removals)."""
        if capped and not _unmount(path):
            err = ctypes.get_errno()
            if err in (errno.ENOENT, errno.EINVAL):
                return
            log.warning("could not unmount %s: %s", path, os.strerror(err))
        try:
            os.rmdir(path)  # the common case: nothing left
        except OSError:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        remove_root(self.root)


__all__ = ["PREFIX", "JobDirs", "can_mount_tmpfs", "remove_root", "tmp_base", "tmp_cap_here"]
