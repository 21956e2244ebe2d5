"""Resolving a job's fs.* target as the job itself would, on the calling thread.

A `validate_lease_op` on a path is checked against the lease after its symlinks
are resolved (protocol.md §8.3), so a link inside a granted directory cannot
point outside it. The supervisor does that resolution for the job, and must not
lend the job its own sight while doing it:

- with the job's credentials: when jobs run as their own uid, the resolving
  thread takes the job's uid and gid as its filesystem ids and drops its
  supplementary groups (setfsuid/setfsgid/setgroups as raw syscalls: they act
  on the calling thread only, where glibc's wrappers would change every thread
  of the supervisor), which also clears the thread's filesystem capabilities;
  when jobs share the supervisor's uid, the thread drops its effective
  capabilities. A directory the job cannot search is not searched for it: the
  check is refused, as the job's own open would be.
- in the job's view of the filesystem: when jobs run as their own uid, from the
  worker's root (`/proc/<worker>/root`, its private mount namespace), and an
  absolute symlink starts again from there;
- never through /proc: its magic links (`/proc/<pid>/fd/N`, `/proc/<pid>/root`,
  `/proc/self`, ...) would resolve in the supervisor's name, not the job's. A
  target under /proc, or one whose walk enters a procfs mount anywhere (a link
  to /proc, /dev/fd), is refused;
- one directory at a time, through O_PATH descriptors opened with O_NOFOLLOW:
  a link swapped in mid-walk is read as a link, never followed by the kernel.

`resolve_as` does it on the calling thread, whose credentials are restored after
each resolution; a thread that cannot restore them is marked tainted
(`this_thread.tainted`) and must not serve again. path_resolve.py runs it off the
event loop. Errors never name what a path resolved to.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import stat
import threading
from collections.abc import Iterator

from shared.lease import PATH_MAX

MAX_LINKS = 40  # symbolic links followed in one resolution (the kernel's MAXSYMLINKS)
MAX_LOOKUPS = 4096  # directory entries looked up in one resolution

PROC_SUPER_MAGIC = 0x9FA0
_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# (setfsuid, setfsgid, setgroups, capget, capset)
_SYSCALLS = {
    "x86_64": (122, 123, 116, 125, 126),
    "aarch64": (151, 152, 159, 90, 91),
}
_CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_raw_syscall = _libc.syscall
_raw_syscall.restype = ctypes.c_long
_raw_syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


class PathRefused(Exception):
    """The path cannot be checked for the job; the message names no resolved path."""


# -- credentials of the calling thread -------------------------------------------------

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _syscall(number: int, a: object = 0, b: object = 0) -> int:
    """syscall(2) with up to two arguments: integers, or ctypes objects passed by address."""
    return int(_raw_syscall(number, _arg(a), _arg(b)))


def _arg(v: object) -> int:
    if v is None:
        return 0
    if isinstance(v, int):
        return v & 0xFFFFFFFFFFFFFFFF
    return ctypes.addressof(v)  # type: ignore[arg-type]


def _numbers() -> tuple[int, int, int, int, int]:
    nums = _SYSCALLS.get(platform.machine())
    if nums is None:
        raise PathRefused(f"paths cannot be resolved with a job's credentials on {platform.machine()}")
    return nums


class _ThreadState(threading.local):
    tainted = False  # its credentials could not be restored: the thread must not serve again


this_thread = _ThreadState()


@contextlib.contextmanager
def _as_job(uid: int | None) -> Iterator[None]:
    """Take the job's filesystem credentials on this thread only, for the block; restore
    them after (a thread whose restore fails is marked tainted, and ends)."""
    setfsuid, setfsgid, setgroups, capget, capset = _numbers()
    if uid is None:
        # The job runs as the supervisor's uid: without the supervisor's capabilities.
        hdr = _CapHeader(_CAP_VERSION_3, 0)
        saved = (_CapData * 2)()
        if _syscall(capget, hdr, saved) != 0:
            raise PathRefused(f"capget failed: {os.strerror(ctypes.get_errno())}")
        if saved[0].effective or saved[1].effective:
            dropped = (_CapData * 2)()
            for i in range(2):
                dropped[i].permitted = saved[i].permitted
                dropped[i].inheritable = saved[i].inheritable
            if _syscall(capset, hdr, dropped) != 0:
                raise PathRefused(f"capset failed: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                _syscall(capset, _CapHeader(_CAP_VERSION_3, 0), saved)
                now = (_CapData * 2)()
                if _syscall(capget, _CapHeader(_CAP_VERSION_3, 0), now) != 0 or \
                        any(now[i].effective != saved[i].effective for i in range(2)):
                    this_thread.tainted = True
        else:
            yield
        return
    old_groups = os.getgroups()
    if _syscall(setgroups, 0, None) != 0:
        raise PathRefused(f"setgroups failed: {os.strerror(ctypes.get_errno())}")
    old_gid = _syscall(setfsgid, uid)
    old_uid = _syscall(setfsuid, uid)
    try:
        # setfsuid/setfsgid report no error; an invalid id (-1) changes nothing and returns the
        # current one, so read back what took.
        if _syscall(setfsuid, -1) != uid or _syscall(setfsgid, -1) != uid:
            raise PathRefused("could not take the job's filesystem ids")
        yield
    finally:
        _syscall(setfsuid, old_uid)
        _syscall(setfsgid, old_gid)
        arr = (ctypes.c_uint32 * max(1, len(old_groups)))(*old_groups)
        _syscall(setgroups, len(old_groups), arr)
        if _syscall(setfsuid, -1) != old_uid or _syscall(setfsgid, -1) != old_gid or \
                os.getgroups() != old_groups:
            this_thread.tainted = True


# -- the walk --------------------------------------------------------------------------

def _on_procfs(fd: int) -> bool:
    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a long) comes first
    if _libc.fstatfs(fd, buf) != 0:
        return True  # unknown: treated as the worst case
    return ctypes.c_long.from_buffer(buf).value == PROC_SUPER_MAGIC


def _refusal(e: OSError) -> PathRefused:
    if e.errno in (errno.EACCES, errno.EPERM):
        return PathRefused("a directory on its way is not searchable by the job")
    return PathRefused(f"looking it up failed ({errno.errorcode.get(e.errno or 0, e.errno)})")


def walk(root: str | int, path: str) -> str:
    """Resolve the absolute, lexically clean `path` from `root` (a directory or an O_PATH
    descriptor of one) with this thread's credentials; return the resolved path.

    Like realpath(3) without strictness: from a component that does not exist, or a file
    that is not a directory, the rest is kept as written and cleaned lexically. PathRefused
    if a directory on the way is not searchable (the job could not reach the path), the walk
    enters procfs, follows more than MAX_LINKS links, looks up more than MAX_LOOKUPS
    entries, or the result would be longer than PATH_MAX.
    """
    if isinstance(root, int):
        root_fd = os.dup(root)
    else:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
    names: list[str] = []
    size = 0  # bytes of "/" + "/".join(names)
    links = lookups = 0
    cur = os.dup(root_fd)
    try:
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if names:
                    try:
                        parent = os.open("..", _O_DIR, dir_fd=cur)
                    except OSError as e:
                        raise _refusal(e) from None
                    os.close(cur)
                    cur = parent
                    size -= len(names.pop().encode("utf-8", "surrogateescape")) + 1
                continue
            lookups += 1
            if lookups > MAX_LOOKUPS:
                raise PathRefused(f"resolving it takes more than {MAX_LOOKUPS} lookups")
            try:
                nxt = os.open(name, _O_DIR, dir_fd=cur)
            except OSError as e:
                if e.errno == errno.ENOENT:
                    todo.append(name)
                    break  # missing (a file to be made, say): the rest as written
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise _refusal(e) from None
                try:
                    st = os.stat(name, dir_fd=cur, follow_symlinks=False)
                    target = os.readlink(name, dir_fd=cur) if stat.S_ISLNK(st.st_mode) else None
                except OSError as e2:
                    if e2.errno in (errno.EINVAL, errno.ENOENT):  # changed under us: look again
                        todo.append(name)
                        continue
                    raise _refusal(e2) from None
                if target is None:  # a file (or device, socket, ...): nothing is below it
                    todo.append(name)
                    break
                links += 1
                if links > MAX_LINKS:
                    raise PathRefused(f"it goes through more than {MAX_LINKS} symbolic links") from None
                if target.startswith("/"):
                    os.close(cur)
                    cur = os.dup(root_fd)
                    names, size = [], 0
                todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                continue
            if _on_procfs(nxt):
                os.close(nxt)
                raise PathRefused("it leads into /proc, where the supervisor resolves nothing for jobs")
            os.close(cur)
            cur = nxt
            names.append(name)
            size += len(name.encode("utf-8", "surrogateescape")) + 1
            if size >= PATH_MAX:
                raise PathRefused(f"it resolves to a path longer than {PATH_MAX - 1} bytes")
    finally:
        os.close(cur)
        os.close(root_fd)
    rest: list[str] = []
    for p in reversed(todo):  # what could not be looked up, cleaned lexically
        if p == "..":
            if rest:
                rest.pop()
            elif names:
                names.pop()
        elif p not in ("", "."):
            rest.append(p)
    out = "/" + "/".join(names + rest)
    if len(out.encode("utf-8", "surrogateescape")) >= PATH_MAX:
        raise PathRefused(f"it resolves to a path longer than {PATH_MAX - 1} bytes")
    return out


def resolve_as(path: str, uid: int | None, root_pid: int | None) -> str:
    """`walk` from the root of process `root_pid` (its mount namespace; None: ours) with the
    job's credentials (`uid`, None: the supervisor's uid without capabilities)."""
    if path == "/proc" or path.startswith("/proc/"):
        raise PathRefused("it is under /proc, where the supervisor resolves nothing for jobs")
    root: str | int = "/"
    if root_pid is not None:
        try:  # opened as the supervisor: the job could not open another process's root
            root = os.open(f"/proc/{root_pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise PathRefused("the job's view of the filesystem is gone") from None
    try:
        with _as_job(uid):
            return walk(root, path)
    finally:
        if isinstance(root, int):
            os.close(root)
