"""Agents that attack the host and the supervisor around Landlock: resource limits,
scheduling, file metadata, SysV IPC, inotify, the network namespace."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from tests.agents import _errno_of
from worker import JobContext

_libc = ctypes.CDLL(None, use_errno=True)


def _raw(result: int) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def reach_others(input: Any, job: JobContext) -> Any:
    """prlimit, scheduling, priority and I/O priority on other processes (the supervisor, the
    fork server, another job's worker); and the same on itself, which must work."""
    import resource

    out: dict[str, str] = {}
    targets = {name: int(pid) for name, pid in input["pids"].items()}
    targets["self"] = os.getpid()
    targets["zero"] = 0
    for name, pid in targets.items():
        out[f"prlimit_{name}"] = _errno_of(lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (64, 64))
                                           if name not in ("self", "zero") else
                                           resource.prlimit(pid, resource.RLIMIT_CORE, (0, 0)))
        out[f"sched_idle_{name}"] = _errno_of(lambda: os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0)))
        out[f"affinity_{name}"] = _errno_of(lambda: os.sched_setaffinity(pid, {0}))
        out[f"nice_{name}"] = _errno_of(lambda: os.setpriority(os.PRIO_PROCESS, pid, 19))
        # ioprio_set(IOPRIO_WHO_PROCESS, pid, class idle << 13)
        out[f"ioprio_{name}"] = _errno_of(lambda: _raw(_libc.syscall(251, 1, pid, 3 << 13)))
        # the same pid with high bits set, which pid_t would truncate to it
        out[f"prlimit_high_{name}"] = _errno_of(lambda: _raw(_libc.syscall(
            302, ctypes.c_long(pid | (1 << 32)), 7, None, ctypes.byref((ctypes.c_ulong * 2)()))))
    out["nice_user"] = _errno_of(lambda: os.setpriority(os.PRIO_USER, 0, 19))
    return out


def host_files(input: Any, job: JobContext) -> Any:
    """Change mode, owner, times and extended attributes of a root-owned file outside the
    lease and of one inside a read-only lease; make a setuid copy of a root-owned binary."""
    out: dict[str, str] = {}
    for tag, path in (("outside", input["outside"]), ("leased_ro", input["leased_ro"])):
        out[f"chmod_{tag}"] = _errno_of(lambda: os.chmod(path, 0o4755))
        out[f"chown_{tag}"] = _errno_of(lambda: os.chown(path, os.getuid(), os.getgid()))
        out[f"utime_{tag}"] = _errno_of(lambda: os.utime(path, (0, 0)))
        out[f"setxattr_{tag}"] = _errno_of(lambda: os.setxattr(path, "user.arcp", b"x"))
    out["read_leased_ro"] = _errno_of(lambda: open(input["leased_ro"]).read())
    if input.get("leased_rw"):
        def write_new() -> None:
            with open(os.path.join(input["leased_rw"], "made-by-job.txt"), "w") as f:
                f.write("hello")
        out["write_leased_rw"] = _errno_of(write_new)
    return out


SHM_KEY = 0x41524350  # "ARCP"


def sysv_shm(input: Any, job: JobContext) -> Any:
    """Create (or look for) a SysV shared memory segment under a fixed key."""
    _libc.shmget.restype = ctypes.c_int
    _libc.shmat.restype = ctypes.c_void_p
    if input.get("create"):
        shmid = _libc.shmget(SHM_KEY, 4096, 0o1000 | 0o600)  # IPC_CREAT, 0600
        if shmid < 0:
            return {"create": errno.errorcode[ctypes.get_errno()]}
        addr = _libc.shmat(shmid, None, 0)
        ctypes.memmove(addr, b"secret of job one", 17)
        return {"create": "ok", "ipc_ns": os.readlink("/proc/self/ns/ipc")}
    shmid = _libc.shmget(SHM_KEY, 0, 0)
    if shmid < 0:
        return {"find": errno.errorcode[ctypes.get_errno()], "ipc_ns": os.readlink("/proc/self/ns/ipc")}
    addr = _libc.shmat(shmid, None, 0o10000)  # SHM_RDONLY
    return {"find": "ok", "data": ctypes.string_at(addr, 17).decode(errors="replace")}


def watch_files(input: Any, job: JobContext) -> Any:
    """inotify on another directory (another job's temp dir, a world-readable host dir)."""
    out = {"inotify_init1": _errno_of(lambda: _raw(_libc.inotify_init1(0))),
           "inotify_init": _errno_of(lambda: _raw(_libc.syscall(253)))}
    out["fanotify_init"] = _errno_of(lambda: _raw(_libc.syscall(300, 0, 0)))
    return out


def tcp_table(input: Any, job: JobContext) -> Any:
    """What this job's network namespace shows: every TCP socket's local port, and how many
    ports a listen() without bind() can take."""
    import socket

    ports = []
    for name in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            with open(name) as f:
                for line in f.read().splitlines()[1:]:
                    ports.append(int(line.split()[1].split(":")[1], 16))
        except OSError as e:
            ports.append(-(e.errno or 1))
    held: list[socket.socket] = []
    for _ in range(int(input.get("autobind", 0))):
        s = socket.socket()
        try:
            s.listen(1)
        except OSError as e:
            s.close()
            return {"ports": ports, "autobind": errno.errorcode.get(e.errno or 0, str(e)), "held": len(held)}
        held.append(s)
    n = len(held)
    for s in held:
        s.close()
    return {"ports": ports, "held": n, "net_ns": os.readlink("/proc/self/ns/net")}


def counts(input: Any, job: JobContext) -> Any:
    """Progress events, then a log event."""
    n = int(input.get("n", 3))
    for i in range(n):
        job.progress(i + 1, n, units="items")
    job.log("info", "counted")
    return {"done": n}


REGISTRY = [
    "counts=tests.host_agents:counts",
    "reachothers=tests.host_agents:reach_others", "hostfiles=tests.host_agents:host_files",
    "sysvshm=tests.host_agents:sysv_shm", "watchfiles=tests.host_agents:watch_files",
    "tcptable=tests.host_agents:tcp_table",
]
