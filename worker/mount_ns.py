"""A private mount namespace in which unprivileged job uids can reach what they must read.

When jobs run as their own uids, every directory on the way to the
interpreter, the venv and the agents must be searchable by them. A host may
keep one of those under a private directory (here: the interpreter under
`/root`, mode 0700). Without touching the host's files, the fork server moves
into a mount namespace of its own (every mount a slave of the host's, so the
supervisor's later mounts, such as each job's temp dir, still appear) and, for
each directory a job could not search, mounts an empty tmpfs (mode 0755) over
it and binds back only the entries on the way to what jobs need. Everything
else under such a directory is simply not there for the workers.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
import sys
from collections.abc import Iterable

from shared.reachability import blocked_dirs

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 1 << 19
_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_private_view(paths: Iterable[str]) -> list[str]:
    """Unshare the mount namespace and open up the directories in the way; returns them."""
    blocked = blocked_dirs(paths)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "making / a slave mount")
    for d in sorted(blocked, key=lambda p: p.count("/")):  # outer directories first
        _open_up(d, sorted(blocked[d]))
    return sorted(blocked)


def _open_up(directory: str, entries: list[str]) -> None:
    held: dict[str, int] = {}
    links: dict[str, str] = {}
    try:
        for name in entries:  # before the tmpfs hides them
            path = os.path.join(directory, name)
            with contextlib.suppress(FileNotFoundError):
                if os.path.islink(path):
                    links[name] = os.readlink(path)
                else:
                    held[name] = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        _check(_libc.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
                           b"mode=0755,size=1m"), f"mounting a tmpfs over {directory}")
        for name, dest in links.items():
            os.symlink(dest, os.path.join(directory, name))
        for name, fd in held.items():
            target = os.path.join(directory, name)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o644))
            _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, MS_BIND | MS_REC, None),
                   f"binding {target} back")
    finally:
        for fd in held.values():
            os.close(fd)


def hide(directory: str) -> None:
    """Mount an empty, read-only tmpfs over `directory`: in this mount view (and its workers')
    it holds nothing, and nothing can be put in it."""
    _check(_libc.mount(b"tmpfs", directory.encode(), b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                       b"mode=0555,size=4k,nr_inodes=4"), f"mounting an empty tmpfs over {directory}")


def own_package_dirs() -> list[str]:
    """This interpreter's base installation's directories of installed packages (a venv made
    from it does not use them unless it says so; then they are on the import path)."""
    import sysconfig

    paths = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    return sorted({paths["purelib"], paths["platlib"]})
