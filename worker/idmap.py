"""Leased paths made usable by the job's own uid without touching the host's files.

A job runs as an unprivileged uid of its own, so a leased directory owned by
someone else (a 0700 build directory of root's, say) would be closed to it.
Changing the host's modes or owners is not an option. Instead, in the worker's
own mount namespace (made when it was forked), each leased root gets an
idmapped bind mount over itself: the files its owner owns appear owned by the
job's uid, and what the job creates there is stored as the owner's. `fs.read`
roots are mounted read-only, so the job cannot change a mode, owner, time or
extended attribute there (EROFS); `fs.write` roots read-write. A directory on
the way to a leased root that the job's uid could not search gets a read-only
idmapped mount too. What a job may actually open is still decided by Landlock,
which follows inodes, not mounts.

Files inside a root that belong to a uid other than the root's owner appear as
the overflow uid (65534) and are reached through their "other" bits only.

Idmapped mounts need a filesystem that supports them (ext4, xfs, btrfs, tmpfs,
overlayfs and others on Linux 6.x). Where one does not, a root that its mode
already opens to every uid is used as it is; any other is an error that names
the path and its filesystem, and the job does not start.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_SYSCALLS = {"x86_64": (428, 429, 442), "aarch64": (428, 429, 442)}  # open_tree, move_mount, mount_setattr
CLONE_NEWUSER = 0x10000000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


@dataclass(frozen=True)
class Mount:
    path: str
    writable: bool


def _syscalls() -> tuple[int, int, int]:
    nrs = _SYSCALLS.get(os.uname().machine)
    if nrs is None:
        raise OSError(0, f"idmapped mounts: syscall numbers unknown on {os.uname().machine}")
    return nrs


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def plan(read_roots: Iterable[str], write_roots: Iterable[str]) -> list[Mount]:
    """The mounts for a lease, outer paths first: every root (read-write for fs.write), and
    the outermost directory on the way to a root that other uids cannot search (read-only)."""
    want: dict[str, bool] = {}
    for roots, writable in ((read_roots, False), (write_roots, True)):
        for root in roots:
            if not os.path.exists(root):
                continue
            want[root] = want.get(root, False) or writable
    writable_roots = [r for r, w in want.items() if w]
    for root in list(want):
        parts = [p for p in root.split("/") if p]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[:i])
            if d != "/" and not _searchable_by_others(d):
                # read-only, unless a writable root holds it (its lease grants writes there)
                inside_writable = any(d == w or d.startswith(w.rstrip("/") + "/") for w in writable_roots)
                want[d] = want.get(d, False) or inside_writable
                break  # the outermost one: a mount there opens what lies below it
    return [Mount(p, w) for p, w in sorted(want.items(), key=lambda kv: (kv[0].count("/"), kv[0]))
            if p != "/" or w]


def _searchable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return True  # not there: nothing to open


def _open_to_others(path: str, writable: bool) -> bool:
    """Does the mode alone already give any uid what the lease grants?"""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    need = stat.S_IROTH | (stat.S_IWOTH if writable else 0) | (stat.S_IXOTH if stat.S_ISDIR(mode) else 0)
    return mode & need == need


UNSHARE = next((p for p in ("/usr/bin/unshare", "/bin/unshare") if os.access(p, os.X_OK)), None)
SLEEP = next((p for p in ("/usr/bin/sleep", "/bin/sleep") if os.access(p, os.X_OK)), None)


def userns_fd(owner_uid: int, owner_gid: int, uid: int) -> int:
    """A user namespace that maps `owner_uid`/`owner_gid` to `uid` (and nothing else), as a
    descriptor: made by a short-lived process that unshares it and waits while its maps are
    written (which needs CAP_SETUID/CAP_SETGID here). util-linux's `unshare`, started with
    posix_spawn, costs a third of a fork of this process; without it, a fork does."""
    if UNSHARE is not None and SLEEP is not None:
        return _userns_by_spawn(owner_uid, owner_gid, uid)
    return _userns_by_fork(owner_uid, owner_gid, uid)


def _write_maps(pid: int, owner_uid: int, owner_gid: int, uid: int) -> int:
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"{owner_uid} {uid} 1\n")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"{owner_gid} {uid} 1\n")
    return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


def _userns_by_spawn(owner_uid: int, owner_gid: int, uid: int) -> int:
    assert UNSHARE is not None and SLEEP is not None
    own = os.stat("/proc/self/ns/user").st_ino
    pid = os.posix_spawn(UNSHARE, ["unshare", "--user", SLEEP, "60"], {})
    try:
        for _ in range(5000):  # 1 s at most
            with contextlib.suppress(FileNotFoundError):
                if os.stat(f"/proc/{pid}/ns/user").st_ino != own:
                    return _write_maps(pid, owner_uid, owner_gid, uid)
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                pid = 0
                break
            time.sleep(0.0002)
        raise OSError(0, "could not make a user namespace for an idmapped mount (unshare --user failed)")
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _userns_by_fork(owner_uid: int, owner_gid: int, uid: int) -> int:
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # only raw calls from here: this may be a copy of a threaded process
        try:
            os.close(go_w)
            os.close(ready_r)
            ok = _libc.unshare(CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(0, "could not make a user namespace for an idmapped mount")
        return _write_maps(pid, owner_uid, owner_gid, uid)
    finally:
        os.close(ready_r)
        os.close(go_w)  # the child reads EOF and exits
        os.waitpid(pid, 0)


def mount_for_uid(mounts: list[Mount], uid: int) -> list[str]:
    """Make each planned mount (in this process's own mount namespace); returns the paths
    mounted. Raises OSError naming the path when one is needed and cannot be made."""
    if not mounts:
        return []
    open_tree, move_mount, mount_setattr = _syscalls()
    namespaces: dict[tuple[int, int], int] = {}
    done: list[str] = []
    try:
        # Inner paths first, each clone recursive: an outer mount then carries the inner ones
        # already in place, and no path is ever walked through a mount that shows it as the
        # job's (this process keeps no capability to override file modes).
        for m in reversed(mounts):
            st = os.stat(m.path)
            key = (st.st_uid, st.st_gid)
            if key not in namespaces:
                namespaces[key] = userns_fd(st.st_uid, st.st_gid, uid)
            tree = _check(_libc.syscall(open_tree, AT_FDCWD, m.path.encode(),
                                        OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE),
                          f"open_tree({m.path})")
            try:
                attr = _MountAttr(MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV
                                  | (0 if m.writable else MOUNT_ATTR_RDONLY), 0, 0, namespaces[key])
                if _libc.syscall(mount_setattr, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr),
                                 ctypes.sizeof(attr)) != 0:
                    err = ctypes.get_errno()
                    if _open_to_others(m.path, m.writable):
                        continue  # its mode already opens it: used as it is
                    raise OSError(err, f"{m.path} cannot be opened to the job's uid: its filesystem "
                                       f"({_fs_type(m.path)}) refused an idmapped mount: {os.strerror(err)}")
                _check(_libc.syscall(move_mount, tree, b"", AT_FDCWD, m.path.encode(), MOVE_MOUNT_F_EMPTY_PATH),
                       f"move_mount({m.path})")
                done.append(m.path)
            finally:
                os.close(tree)
    finally:
        for fd in namespaces.values():
            os.close(fd)
    return done


def refusal(path: str, userns: int) -> str:
    """Why an idmapped mount of `path` cannot be made here ("" if it can): a clone of it is
    given the user namespace `userns`, and dropped, never mounted anywhere."""
    open_tree, _move_mount, mount_setattr = _syscalls()
    tree = _libc.syscall(open_tree, AT_FDCWD, path.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if tree < 0:
        return os.strerror(ctypes.get_errno())
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns)
        if _libc.syscall(mount_setattr, tree, b"", AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
            return f"{_fs_type(path)}: {os.strerror(ctypes.get_errno())}"
        return ""
    finally:
        os.close(tree)


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding `path` (from /proc/self/mountinfo)."""
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                point = fields[4].encode().decode("unicode_escape")
                if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                    best, fstype = point, fields[sep + 1]
    except (OSError, ValueError, IndexError):
        pass
    return fstype
