"""`arcp-supervisor doctor`: what isolation this host offers, what `run` uses, what is missing.

Every fact is read from the host (no guesses); each guarantee of contract.md
"What a job cannot do" is listed with the layers that enforce it here, and the
exit status is 1 when any guarantee has none.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from shared.landlock import landlock_abi
from shared.reachability import blocked_dirs, unreadable_files
from supervisor.sandbox.job_dirs import can_mount_tmpfs, tmp_base
from shared.seccomp import seccomp_available

PR_GET_SECCOMP = 21


@dataclass
class Layer:
    name: str
    available: bool
    used: bool
    detail: str = ""


@dataclass
class Guarantee:
    name: str
    enforced_by: list[str] = field(default_factory=list)
    missing: str = ""

    @property
    def ok(self) -> bool:
        return not self.missing


def _seccomp_available() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0)


def _cgroups() -> tuple[str, list[str]]:
    """('v1'/'v2'/'none', writable controllers)."""
    base = "/sys/fs/cgroup"
    if os.path.exists(os.path.join(base, "cgroup.controllers")):
        try:
            with open(os.path.join(base, "cgroup.subtree_control")) as f:
                ctl = f.read().split()
        except OSError:
            ctl = []
        return "v2", [c for c in ctl if os.access(base, os.W_OK)]
    v1 = []
    for c in ("memory", "pids", "cpu", "cpuacct", "freezer"):
        d = os.path.join(base, c)
        if os.path.isdir(d) and os.access(d, os.W_OK) and os.path.exists(os.path.join(d, "tasks")):
            v1.append(c)
    return ("v1" if v1 else "none"), v1


def _cgroups_usable(mode: str, controllers: list[str]) -> bool:
    return mode != "none" and {"memory", "pids"} <= set(controllers)


def _namespaces() -> list[str]:
    return [ns for ns in ("pid", "net", "mnt", "user") if os.path.exists(f"/proc/self/ns/{ns}")]


def _in_container() -> bool:
    return os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv")


def _job_uids_layer(root: bool, job_uids: tuple[int, int] | None) -> Layer:
    """Whether jobs get uids of their own, and whether those can read Python, the venv and the agents."""
    if not root:
        return Layer("job-uids", False, False, "jobs would run under the supervisor's uid (job uids need root)")
    from supervisor.config import DEFAULT_JOB_UIDS, ConfigError, check_uid_range

    where = "[sandbox] job_uids" if job_uids is not None else "the default range"
    job_uids = job_uids or DEFAULT_JOB_UIDS
    detail = f"uids {job_uids[0]}-{job_uids[1]} ({where}); "
    try:
        check_uid_range(job_uids, "job uids")
    except ConfigError as e:
        return Layer("job-uids", True, False, detail + f"REFUSED: {e}: `run` will not start")
    needed = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), os.getcwd()]
    files = [os.path.realpath(sys.executable), os.path.join(os.path.dirname(os.__file__), "os.py")]
    closed = sorted(blocked_dirs(needed))
    bad = unreadable_files(files)
    if bad:
        return Layer("job-uids", True, False, detail + f"NOT readable by them: {', '.join(bad)}: `run` will "
                                                       f"not start")
    detail += (f"Python and the venv readable through a private mount view that opens {', '.join(closed)}"
               if closed else "Python and the venv readable as they are")
    return Layer("job-uids", True, True, detail)


def _idmap_probe(paths: list[str]) -> dict[str, str]:
    """For each path: "" if an idmapped mount of it can be made here, else why not. Probed in
    a child with a mount namespace of its own, so nothing is mounted anywhere."""
    import json

    from worker import idmap

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out: dict[str, str] = {}
        try:
            os.close(r)
            if ctypes.CDLL(None, use_errno=True).unshare(0x00020000) != 0:  # CLONE_NEWNS
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
            ns = idmap.userns_fd(0, 0, 65534)
            out = {p: idmap.refusal(p, ns) for p in paths}
        except OSError as e:
            out = {p: str(e) for p in paths}
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        b = os.read(r, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(r)
    os.waitpid(pid, 0)
    try:
        result: dict[str, str] = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        result = {}
    return {p: result.get(p, "probe failed") for p in paths}


def _idmap_layer(root: bool) -> Layer:
    if not root:
        return Layer("idmapped-mounts", False, False, "needs root (job uids)")
    import tempfile

    paths = sorted({tempfile.gettempdir(), os.getcwd(), tmp_base(), os.path.expanduser("~")})
    paths = [p for p in paths if os.path.isdir(p)]
    probe = _idmap_probe(paths)
    bad = {p: why for p, why in probe.items() if why}
    ok = [p for p in paths if p not in bad]
    detail = "leased paths mounted for the job's uid (fs.read read-only), host files untouched"
    if ok:
        detail += f"; works on {', '.join(ok)}"
    if bad:
        detail += ("; NOT on " + ", ".join(f"{p} ({why})" for p, why in bad.items())
                   + ": a leased path there is usable only where its mode opens it to every uid, else the "
                     "job does not start")
    return Layer("idmapped-mounts", bool(ok), bool(ok), detail)


def examine(job_uids: tuple[int, int] | None = None,
            allow_shared_uid: bool = False) -> tuple[list[Layer], list[Guarantee]]:
    abi = landlock_abi()
    mode, controllers = _cgroups()
    ns = _namespaces()
    root = os.geteuid() == 0
    egress = root and "net" in ns and abi >= 4
    tmp_cap, tmp_why = can_mount_tmpfs(tmp_base())
    layers = [
        Layer("landlock", abi > 0, abi > 0, f"ABI {abi}" if abi else "not in this kernel"),
        Layer("landlock-net", abi >= 4, abi >= 4,
              "TCP bind refused; connect only to the job's egress port" if abi >= 4 else "needs ABI 4"),
        Layer("landlock-scopes", abi >= 6, abi >= 6, "signals and abstract sockets" if abi >= 6 else "needs ABI 6"),
        Layer("seccomp", _seccomp_available(), seccomp_available(),
              "deny-list filter (errors, not kills)" if seccomp_available() else "libseccomp not reachable"),
        Layer(f"cgroup-{mode}", mode != "none", _cgroups_usable(mode, controllers),
              f"writable controllers: {', '.join(controllers) or 'none'}; a group per worker (memory, pids)"),
        Layer("netns-empty", root and "net" in ns, root and "net" in ns,
              "only a loopback, no route out: one per worker (root), else one shared by all workers"),
        Layer("egress-proxy", egress, egress,
              "net.fetch through the supervisor: plain HTTP checked by full URL; HTTPS CONNECT by scheme, "
              "host and port only (the path is encrypted)" if egress else
              "needs the network namespace and Landlock ABI 4: jobs with net.fetch get no network"),
        Layer("tmp-size-cap", tmp_cap, tmp_cap,
              "each job's HOME/TMPDIR a tmpfs of its own (--tmp-size, at most half its memory)" if tmp_cap
              else f"{tmp_why}: job temp dirs are bounded only by the memory cgroup"),
        Layer("namespaces", bool(ns), bool(ns) and root, f"kernel has {', '.join(ns)}; per worker: mnt, ipc and "
              "net (root only); pid, user: not used (the cgroup finds every task)"),
        Layer("mntns-per-worker", root and "mnt" in ns, root and "mnt" in ns,
              "each worker's own mount namespace (its leased paths' idmapped mounts)"),
        Layer("ipcns-per-worker", root, root, "each worker's own SysV/POSIX IPC, gone with it"),
        Layer("netns-per-worker", root and "net" in ns, root and "net" in ns,
              "each worker's own network namespace: its loopback holds only its egress port"),
        Layer("seccomp-self-only", seccomp_available(), seccomp_available(),
              "prlimit64, sched_set*, setpriority, ioprio_set, migrate_pages, move_pages act on the caller "
              "only; process_madvise, pidfd_getfd, kcmp, inotify, fanotify refused"),
        _idmap_layer(root),
        Layer("rlimits", True, True, "cpu, open files, file size, processes (processes: ignored for root)"),
        Layer("memory-watchdog", True, True, "resident size of each job's process tree, every 100 ms"),
        Layer("no-new-privs", True, True, "set before Landlock"),
        Layer("no-capabilities", True, True, "bounding, ambient, effective, permitted and inheritable sets emptied"),
        Layer("process-group", True, True, "each worker in its own session; dies with the supervisor"),
        Layer("scrubbed-env", True, True, "PATH, LANG, LC_*, TZ; HOME and TMPDIR private"),
        Layer("root", root, root, "supervisor runs as root" if root else "supervisor is unprivileged"),
        _job_uids_layer(root, job_uids),
        Layer("container", _in_container(), False, "inside a container" if _in_container() else "not a container"),
    ]
    by_name = {layer.name: layer for layer in layers}
    uids_ok = by_name["job-uids"].used
    idmap_ok = by_name["idmapped-mounts"].used
    g = [
        Guarantee("files", ["landlock"] if abi else [], "" if abi else "no Landlock: the filesystem is open"),
        Guarantee("network", (["netns-empty"] if root and "net" in ns else []) + (["landlock-net"] if abi >= 4 else []),
                  "" if root and "net" in ns else "no network namespace: UDP, DNS and raw sockets are not blocked"),
        Guarantee("environment", ["scrubbed-env"]),
        Guarantee("descriptors-and-privileges", ["no-new-privs", "no-capabilities", "process-group"]
                  + (["seccomp"] if seccomp_available() else []),
                  "" if seccomp_available() else "no seccomp filter"),
        Guarantee("other-jobs", (["landlock-scopes"] if abi >= 6 else [])
                  + ([f"cgroup-{mode}"] if _cgroups_usable(mode, controllers) else [])
                  + (["job-uids", "ipcns-per-worker", "netns-per-worker"] if uids_ok else [])
                  + (["seccomp-self-only"] if seccomp_available() else []),
                  "" if abi >= 6 and _cgroups_usable(mode, controllers) and uids_ok and seccomp_available() else
                  "no Landlock scopes, no cgroup, no seccomp or no job uids: another job's (or the "
                  "supervisor's) processes, limits, scheduling or IPC can be reached"),
        Guarantee("own-uid", ["job-uids"] if uids_ok else [],
                  "" if uids_ok else ("jobs run under the supervisor's uid: they can prlimit, renice and signal "
                                      "nothing only where seccomp and Landlock refuse it, and can chmod, chown, "
                                      "utime and setxattr its files outside their lease"
                                      + (" (accepted: --allow-shared-uid)" if allow_shared_uid else ""))),
        Guarantee("host-files", (["job-uids", "idmapped-mounts"] if uids_ok and idmap_ok else []),
                  "" if uids_ok and idmap_ok else "jobs share a uid that owns host files, or leased paths cannot "
                                                  "be given to their uids: modes, owners, times and extended "
                                                  "attributes outside the lease are not protected"
                                                  + (" (accepted: --allow-shared-uid)" if allow_shared_uid and
                                                     not uids_ok else "")),
    ]
    return layers, g


# What --allow-shared-uid accepts: the guarantees that only a uid of the job's own gives.
SHARED_UID_ACCEPTS = ("own-uid", "host-files", "other-jobs")


def report(as_json: bool, job_uids: tuple[int, int] | None = None,
           allow_shared_uid: bool = False) -> tuple[str, int]:
    layers, guarantees = examine(job_uids, allow_shared_uid)
    shared_uid = os.geteuid() != 0
    ok = all(g.ok or (allow_shared_uid and shared_uid and g.name in SHARED_UID_ACCEPTS) for g in guarantees)
    if as_json:
        import json

        data: dict[str, Any] = {
            "layers": [vars(layer) for layer in layers],
            "guarantees": [{"name": g.name, "enforced_by": g.enforced_by, "ok": g.ok, "missing": g.missing}
                           for g in guarantees],
            "ok": ok, "python": sys.version.split()[0], "kernel": os.uname().release,
        }
        return json.dumps(data, indent=2), 0 if ok else 1
    lines = [f"{'layer':18} {'here':5} {'used':5} detail"]
    for layer in layers:
        lines.append(f"{layer.name:18} {'yes' if layer.available else 'no':5} {'yes' if layer.used else 'no':5} "
                     f"{layer.detail}")
    lines.append("")
    for g in guarantees:
        by = ", ".join(g.enforced_by) or "nothing"
        lines.append(f"guarantee {g.name:28} {'OK ' if g.ok else 'NOT'} enforced by {by}"
                     + (f"; missing: {g.missing}" if g.missing else ""))
    return "\n".join(lines), 0 if ok else 1


def agents_report(config: Any, as_json: bool = False) -> tuple[list[str], bool]:
    """Import every agent of `config` in a sandboxed worker, as `run` does at start: one line
    per agent entry, and whether all of them import."""
    import asyncio

    from supervisor.agent_check import check_agents
    from supervisor.config import ConfigError
    from supervisor.runtime import Runtime

    async def go() -> list[str]:
        rt = Runtime(config)
        try:
            await rt.start()
            return await check_agents(rt)
        finally:
            await rt.close()

    try:
        problems = asyncio.run(go())
    except ConfigError as e:
        return [f"agents NOT checked: {e}"], False
    failed = {p.split(" (", 1)[0] for p in problems}
    lines = []
    for a in config.agents:
        name = f"agent {a.name}@{a.version}"
        if not any(name in f for f in failed):
            lines.append(f"{name} ({a.entry}): imports in a sandboxed worker")
    lines += [p.replace("): ", "): FAILED: ", 1) for p in problems]
    return lines, not problems
