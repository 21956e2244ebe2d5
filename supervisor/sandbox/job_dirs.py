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
so a supervisor that was killed leaves nothing another one cannot clean up.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import tempfile

log = logging.getLogger("arcp.jobs")

MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_SHARED = 0x2, 0x4, 0x20, 0x1000, 1 << 20
MNT_DETACH = 0x2
PREFIX = "arcp-supervisor-"
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


def _mounts_under(root: str) -> list[str]:
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(root + "/"):
                    out.append(point)
    except OSError:
        pass
    return sorted(out, key=len, reverse=True)


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


class JobDirs:
    def __init__(self, base: str | None = None, size: int = 256 << 20, shared: bool = False) -> None:
        """`shared`: the root becomes a shared mount, so that the per-job mounts made here
        also appear in the workers' own mount namespace (job uids on)."""
        self.base = base or tmp_base()
        self.size = size
        self.root = os.path.join(self.base, f"{PREFIX}{os.getpid()}")
        self._clean_stale()
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

    def _clean_stale(self) -> None:
        """Directories of supervisors that are gone: unmount what they left, remove the rest."""
        try:
            names = os.listdir(self.base)
        except OSError:
            return
        for name in names:
            if not name.startswith(PREFIX) or not name[len(PREFIX):].isdigit():
                continue
            pid = int(name[len(PREFIX):])
            if pid != os.getpid() and os.path.exists(f"/proc/{pid}"):
                continue  # a live supervisor's
            root = os.path.join(self.base, name)
            for point in _mounts_under(root):
                _unmount(point)
            _unmount(root)  # its shared bind mount, if it had one
            shutil.rmtree(root, ignore_errors=True)

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
        """Unmount (lazily: a dying process may still hold it) and remove."""
        if capped and not _unmount(path):
            log.warning("could not unmount %s: %s", path, os.strerror(ctypes.get_errno()))
        try:
            os.rmdir(path)  # the common case: nothing left
        except OSError:
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        for point in _mounts_under(self.root):
            _unmount(point)
        if self.shared:
            _unmount(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
