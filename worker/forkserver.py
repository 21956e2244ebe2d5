"""The fork server: a warm, pre-imported process that forks one worker per request.

The supervisor starts this process once, with one end of a SOCK_SEQPACKET
socket pair. Each request is one packet:

    ["spawn", req_id, reuse, [cgroup.procs path, ...]]  + one descriptor (the worker's end of its job pipe)

and is answered with ``["spawned", req_id, pid]`` (or ``["spawn_failed",
req_id, message]``).

    ["listen", req_id, worker_pid]

opens a listening TCP socket on the loopback of that worker's network namespace
(the egress proxy's port for one job; without a pid, or where workers share the
fork server's namespace, on that one's loopback) and answers ``["listening", req_id, port]`` with the descriptor
attached, or ``["listen_failed", req_id, message]``. Whenever a worker exits, the fork server reaps it and
sends ``["exited", pid, wait_status]``. Forking a process that has already
imported the runtime costs about a millisecond; starting an interpreter costs
tens. The fork server is single-threaded, so forking it is safe, and it dies
with the supervisor (parent-death signal), as its workers die with it.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import json
import os
import select
import signal
import socket
import struct
import sys
from typing import Any

import msgpack

# Pre-import the runtime and the standard library agents commonly use (trusted
# code only: agent modules are compiled here, never run), so a forked worker starts warm.
import asyncio  # noqa: F401
import base64  # noqa: F401
import collections  # noqa: F401
import dataclasses  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import inspect  # noqa: F401
import itertools  # noqa: F401
import json  # noqa: F401
import pathlib  # noqa: F401
import random  # noqa: F401
import re  # noqa: F401
import threading  # noqa: F401
import time  # noqa: F401
import traceback  # noqa: F401
import typing  # noqa: F401

import worker.import_path
import worker.json_value
import worker.runner  # noqa: F401
from shared.exit_codes import BOOT_ERROR
import worker.sandbox
from worker.agent_loader import precompile
from worker.sandbox import set_parent_death_signal

CLONE_NEWNET = 0x40000000
MAX_PACKET = 64 * 1024
WORKER_NAMESPACES = False  # each worker makes its own mount, IPC and network namespace
OWN_NETNS = -1  # a descriptor of the fork server's network namespace, to return to
_libc = ctypes.CDLL(None, use_errno=True)


def enter_empty_netns() -> bool:
    """Move the fork server, and so every worker it forks, into a network namespace of
    its own: no interface but loopback, no route anywhere. One namespace for all
    workers costs nothing per job; jobs are kept apart inside it by Landlock (a job
    may connect to its own egress port only, and bind nothing) and seccomp (no
    datagram or raw sockets, no namespace changes), and hold no capability."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        print(f"arcp fork server: no network namespace ({os.strerror(err)}): jobs keep the host's network",
              file=sys.stderr)
        return False
    return True


def bring_up_loopback() -> bool:
    """`lo` up in the new namespace: the egress proxy's ports live on it."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sh22x", b"lo", 0)
            flags = struct.unpack("16sh22x", fcntl.ioctl(s, siocgifflags, req))[1]
            fcntl.ioctl(s, siocsifflags, struct.pack("16sh22x", b"lo", flags | iff_up))
        return True
    except OSError as e:
        print(f"arcp fork server: loopback not up ({e}): no egress proxy for net.fetch", file=sys.stderr)
        return False


def open_listener() -> socket.socket:
    """A listening socket on the namespace's loopback, on a port the kernel picks."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        s.listen(128)
    except OSError:
        s.close()
        raise
    return s


def open_listener_of(pid: int) -> socket.socket:
    """A listening socket on the loopback of worker `pid`'s network namespace (brought up
    first): the fork server steps into it, opens the socket, and steps back. The socket
    stays in that namespace, so only that worker can connect to it."""
    target = _own_netns_of(pid)
    try:
        if _libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into worker {pid}'s network namespace failed")
        try:
            if not bring_up_loopback():
                raise OSError(0, "the worker's loopback did not come up")
            return open_listener()
        finally:
            if _libc.setns(OWN_NETNS, CLONE_NEWNET) != 0:  # cannot go back: never fork from there
                print("arcp fork server: cannot return to its own network namespace", file=sys.stderr)
                os._exit(BOOT_ERROR)
    finally:
        os.close(target)


def _own_netns_of(pid: int) -> int:
    """A descriptor of worker `pid`'s own network namespace. A worker makes it right after
    fork, so a request can arrive first: wait for it (a few milliseconds at most), rather
    than open the port in the fork server's namespace, where the job could not reach it."""
    own = os.fstat(OWN_NETNS).st_ino
    for _ in range(400):  # 2 s at most
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        if os.fstat(fd).st_ino != own:
            return fd
        os.close(fd)
        time.sleep(0.005)
    raise OSError(0, f"worker {pid} has no network namespace of its own")


def _send(ctl: socket.socket, msg: list[Any]) -> None:
    try:
        ctl.send(msgpack.packb(msg))
    except ConnectionError:
        os._exit(0)  # the supervisor is gone: so are we (and our workers, by parent-death signal)


def _child(ctl: socket.socket, wake_r: int, wake_w: int, pipe_fd: int, reuse: int, zygote: int,
           cgroup_procs: list[str]) -> None:
    """In the forked worker: join its cgroups, detach, keep only its pipe, then serve jobs."""
    try:
        for path in cgroup_procs:  # "0": this process (uid 0 may write these root-owned 0644 files)
            with open(path, "w") as f:
                f.write("0")
        if WORKER_NAMESPACES:
            worker.sandbox.enter_worker_namespaces()
        os.setsid()
        set_parent_death_signal(zygote)
        worker.sandbox.PARENT = zygote
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        ctl.close()
        os.close(wake_r)
        os.close(wake_w)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        if devnull != 0:
            os.close(devnull)
        if pipe_fd < 3:
            moved = os.dup(pipe_fd)
            os.close(pipe_fd)
            pipe_fd = moved
        os.closerange(3, pipe_fd)
        os.closerange(pipe_fd + 1, 1 << 16)
        os.set_inheritable(pipe_fd, False)
    except BaseException as e:  # set-up failed: report on the real stderr and exit
        print(f"arcp worker: set-up failed: {e}", file=sys.__stderr__)
        os._exit(BOOT_ERROR)
    worker.runner.worker_main(pipe_fd, reuse)


def _needed(modules: list[str]) -> list[str]:
    """What jobs of this fork server read: Python, the worker runtime, the agents' directories,
    the import path."""
    dirs = [d for m in modules for d in worker.runner.agent_dirs(m)]
    return worker.sandbox.python_read_dirs(dirs) + [os.getcwd()] + worker.import_path.JOB_PATH


def open_up_for_job_uids(modules: list[str]) -> dict[str, Any]:
    """Job uids on: a private mount view where they can read Python, the runtime and the agents."""
    import worker.mount_ns

    try:
        opened = worker.mount_ns.enter_private_view(_needed(modules))
    except OSError as e:
        print(f"arcp fork server: job uids off: {e}", file=sys.stderr)
        return {"job_uids": False, "job_uids_error": str(e)}
    return {"job_uids": True, "opened": opened}


def hide_other_packages(modules: list[str], candidates: list[str], private_view: bool) -> dict[str, Any]:
    """Mount an empty read-only directory over every directory of installed packages that is
    not this environment's own (the supervisor's site-packages, the base interpreter's, the
    system's): jobs can neither import nor read them. Needs a private mount view: the one job
    uids made, else one made here (which takes root); without one they stay readable (Landlock
    does not cover the supervisor's venv; an interpreter's own installation it must)."""
    import worker.mount_ns

    keep = [os.path.realpath(p) for p in _needed(modules) if p and p != "/" and p not in worker.sandbox.SYSTEM_READ]
    hide = []
    for d in dict.fromkeys(candidates + worker.mount_ns.own_package_dirs()):
        real = os.path.realpath(d)
        if not os.path.isdir(real) or any(_within(k, real) for k in keep):
            continue  # (a directory jobs need is in it: the environment's own, or an agent's)
        hide.append(real)
    if not hide:
        return {"hidden": []}
    try:
        if not private_view:
            worker.mount_ns.enter_private_view([])
        for d in hide:
            worker.mount_ns.hide(d)
    except OSError as e:
        print(f"arcp fork server: installed packages not hidden from jobs: {e}", file=sys.stderr)
        return {"hidden": [], "hide_error": str(e), "not_hidden": hide}
    return {"hidden": hide}


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def serve(ctl_fd: int, parent: int, modules: list[str], job_uids: bool = False, hide: list[str] | None = None) -> None:
    set_parent_death_signal(parent)
    zygote = os.getpid()
    ctl = socket.socket(fileno=ctl_fd)
    ctl.setblocking(True)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # the supervisor decides when we stop
        signal.signal(sig, signal.SIG_IGN)
    netns = enter_empty_netns()
    loopback = netns and bring_up_loopback()
    uid_facts: dict[str, Any] = open_up_for_job_uids(modules) if job_uids else {"job_uids": False}
    if hide is not None:
        uid_facts.update(hide_other_packages(modules, hide, private_view=bool(uid_facts["job_uids"])))
    global WORKER_NAMESPACES, OWN_NETNS
    if uid_facts["job_uids"] and netns:
        WORKER_NAMESPACES = True
        OWN_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        uid_facts["worker_namespaces"] = ["mnt", "ipc", "net"]
    # After the namespaces (which need CAP_SYS_ADMIN): what every job's sandbox shares. The fork
    # server then holds no capability (but CAP_SETUID/SETGID for job uids), so no worker inherits one.
    worker.sandbox.prepare(modules, worker.runner.agent_dirs, keep_setid=bool(uid_facts["job_uids"]),
                           shared_netns=not WORKER_NAMESPACES)
    _send(ctl, ["ready", {"netns": netns, "loopback": loopback, "python": sys.version.split()[0],
                          "seccomp": worker.sandbox.SECCOMP_BPF is not None,
                          "fast_json": worker.json_value.FAST, **uid_facts}])
    while True:
        try:
            ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
            _reap(ctl)
        if ctl.fileno() in ready:
            try:
                data, fds, _flags, _addr = socket.recv_fds(ctl, MAX_PACKET, 4)
            except InterruptedError:
                continue
            except ConnectionError:
                os._exit(0)  # the supervisor closed the control socket with requests unread
            if not data:
                os._exit(0)  # supervisor closed the control socket
            _handle(ctl, data, fds, wake_r, wake_w, zygote)


def _handle(ctl: socket.socket, data: bytes, fds: list[int], wake_r: int, wake_w: int, zygote: int) -> None:
    try:
        msg = msgpack.unpackb(data)
        if msg[0] == "listen" and not fds:
            _listen(ctl, msg[1], int(msg[2]) if len(msg) > 2 and msg[2] else 0)
            return
        op, req_id, reuse = msg[0], msg[1], int(msg[2])
        cgroup_procs = [str(p) for p in msg[3]] if len(msg) > 3 else []
        if op != "spawn" or len(fds) != 1:
            raise ValueError(f"bad request {op!r} with {len(fds)} descriptors")
    except (ValueError, TypeError, IndexError, msgpack.UnpackException) as e:
        for fd in fds:
            os.close(fd)
        print(f"arcp fork server: bad request: {e}", file=sys.stderr)
        return
    pipe_fd = fds[0]
    try:
        pid = os.fork()
    except OSError as e:
        os.close(pipe_fd)
        _send(ctl, ["spawn_failed", req_id, f"fork failed: {e}"])
        return
    if pid == 0:
        _child(ctl, wake_r, wake_w, pipe_fd, reuse, zygote, cgroup_procs)
        os._exit(0)  # not reached
    os.close(pipe_fd)
    _send(ctl, ["spawned", req_id, pid])


def _listen(ctl: socket.socket, req_id: Any, pid: int) -> None:
    try:
        listener = open_listener_of(pid) if WORKER_NAMESPACES and pid else open_listener()
    except OSError as e:
        _send(ctl, ["listen_failed", req_id, f"cannot listen on the worker's loopback: {e}"])
        return
    with listener:
        socket.send_fds(ctl, [msgpack.packb(["listening", req_id, listener.getsockname()[1]])],
                        [listener.fileno()])


def _reap(ctl: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send(ctl, ["exited", pid, status])


def main(argv: list[str]) -> None:
    """`CTL_FD PARENT_PID OPTIONS`: OPTIONS is a JSON object, every key optional:
    `modules` (agent modules to compile ahead), `job_uids` (set up for job uids), `path`
    (the agent environment's import directories), `cwd_on_path` (the directory started in
    goes on the job's import path, after them), `runtime` (the worker runtime's directory,
    which worker/__main__.py put first on this process's path), `own_prefix` (the
    interpreter is the agent's: jobs may read its prefix and import its site-packages),
    `hide` (directories of installed packages to hide, or null)."""
    if len(argv) != 3:
        print("usage: python -m worker CTL_FD PARENT_PID OPTIONS_JSON", file=sys.stderr)
        sys.exit(2)
    opts = json.loads(argv[2])
    modules = [str(m) for m in opts.get("modules", [])]
    runtime = opts.get("runtime")
    dirs = [str(p) for p in opts.get("path", [])]
    # The job's import path, built here and not inherited (worker/import_path.py); this
    # process keeps its own, which holds nothing of the agent's.
    worker.import_path.build(dirs, os.getcwd() if opts.get("cwd_on_path", True) else None, runtime,
                             own_prefix=bool(opts.get("own_prefix")))
    for line in worker.import_path.SKIPPED_PTH[:20]:
        print(f"arcp fork server: a .pth line that is code is not run (jobs import without it): {line}",
              file=sys.stderr)
    worker.sandbox.configure_environment([*dirs, *([runtime] if runtime else [])],
                                         own_prefix=bool(opts.get("own_prefix")))
    precompile(modules)
    # Everything imported so far lives as long as we do: keep the collector from
    # walking (and so copying) those pages in every forked worker.
    gc.collect()
    gc.freeze()
    serve(int(argv[0]), int(argv[1]), modules, bool(opts.get("job_uids")), opts.get("hide"))
