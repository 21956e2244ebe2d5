"""Which isolation layers jobs get: decided here once, for `doctor` and for `run`.

A layer's use depends on two things: facts of the host (`Host`: the Landlock ABI, seccomp,
root) and what `run` sets up for its workers there (`Setup`: its cgroups, its job dirs'
tmpfs cap, the network namespace and job uids the fork server confirms, the namespaces each
worker makes, where idmapped mounts can be made). The runtime passes what it did set up
(`confirmed`); `doctor` passes what `run` would set up, measured by trying each piece the way
`run` does it (`measure`, which calls `expected`). From the same two, `decide` makes one row
per layer, doctor's table, and each row names what job.accepted's
`x-vendor.arcp-supervisor.sandbox` list says for it when it is used: the list is made from
the used rows, so `doctor` cannot claim a layer that `run` does not apply, nor omit one it does.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared import capabilities
from shared.landlock import landlock_abi
from shared.seccomp import seccomp_available
from supervisor.sandbox.cgroup_host import CgroupHost, detect
from supervisor.sandbox.job_dirs import tmp_base, tmp_cap_here

PR_GET_SECCOMP = 21
CLONE_NEWNS, CLONE_NEWNET = 0x00020000, 0x40000000
NAMESPACES = ("pid", "net", "mnt", "ipc", "user")
# What a worker makes of its own when the fork server has job uids and a network namespace
# (worker/forkserver.py serve()); otherwise the workers share the fork server's.
WORKER_NAMESPACES = ("mnt", "ipc", "net")
# job.accepted's list for every job, in this order (a row's job names are listed at its place;
# "cgroup" stands for the row `cgroup-<version>`).
JOB_ORDER = ("process-group", "parent-death-signal", "scrubbed-env", "private-tmp", "rlimits", "memory-watchdog",
             "no-new-privs", "no-capabilities", "landlock", "seccomp", "seccomp-self-only", "cgroup", "job-uids",
             "idmapped-mounts", "hidden-packages", "shared-uid", "mntns-per-worker", "ipcns-per-worker", "netns-per-worker",
             "netns-empty")
# Added to a job's list when the runtime accepts it: tmp-size-cap where job dirs are capped,
# egress-proxy for a job whose lease has net.fetch where the proxy is available.
PER_JOB = ("tmp-size-cap", "egress-proxy")
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Layer:
    """One row of doctor's table, and what job.accepted lists for it where it is used."""

    name: str
    available: bool  # this host offers it
    used: bool  # `run` applies it
    detail: str = ""
    job: tuple[str, ...] = ()  # its names in job.accepted's sandbox list (none: a fact, or a part of another)


@dataclass(frozen=True)
class Host:
    """Facts of the kernel and of this process."""

    landlock_abi: int
    seccomp_kernel: bool  # the kernel has seccomp
    libseccomp: bool  # and a filter can be built here (libseccomp, through pyseccomp)
    root: bool
    namespaces: tuple[str, ...] = NAMESPACES  # those the kernel has
    container: bool = False
    setid_caps: bool = True  # holds what job uids take (shared/capabilities.py FOR_JOB_UIDS)

    @property
    def own_uids(self) -> bool:
        """Can jobs be given uids of their own here (root, with the capabilities for it)?"""
        return self.root and self.setid_caps

    @classmethod
    def read(cls) -> Host:
        return cls(landlock_abi=landlock_abi(),
                   seccomp_kernel=bool(_libc.prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0),
                   libseccomp=seccomp_available(),
                   root=os.geteuid() == 0,
                   setid_caps=not capabilities.missing(capabilities.FOR_JOB_UIDS),
                   namespaces=tuple(ns for ns in NAMESPACES if os.path.exists(f"/proc/self/ns/{ns}")),
                   container=os.path.exists("/.dockerenv") or os.path.exists("/run/.containerenv"))

    @property
    def seccomp(self) -> bool:
        """Workers get the seccomp filters."""
        return self.seccomp_kernel and self.libseccomp


@dataclass(frozen=True)
class Setup:
    """What `run` sets up for its workers (all off: nothing set up yet)."""

    cgroup: CgroupHost = CgroupHost("none", (), "not set up")  # where a worker gets its groups
    tmp_capped: bool = False  # each worker's HOME/TMPDIR is a tmpfs of its own
    tmp_why: str = ""  # why not
    netns: bool = False  # the workers are in a network namespace with no route out
    loopback: bool = False  # whose loopback is up: the egress proxy's ports live there
    job_uids: bool = False  # jobs run as uids of their own
    job_uids_detail: str = ""
    worker_namespaces: tuple[str, ...] = ()  # the namespaces each worker makes of its own
    idmap: dict[str, str] = field(default_factory=dict)  # path -> "" where an idmapped mount can be made, else why
    packages_hidden: bool = False  # installed packages not the job's environment's are hidden by a mount
    packages_detail: str = ""  # which, or why not


class ForkServerFacts(Protocol):
    """What the runtime's fork server confirmed in its "ready" message (its ForkServer's attributes)."""

    netns: bool
    loopback: bool
    job_uids: bool
    job_uids_error: str
    opened: list[str]
    worker_namespaces: list[str]
    hidden: list[str]
    not_hidden: list[str]
    hide_error: str


class CgroupsMade(Protocol):
    """The runtime's groups (sandbox/cgroups.py Cgroups)."""

    in_use: CgroupHost


class JobDirsMade(Protocol):
    """The runtime's job dirs (sandbox/job_dirs.py JobDirs)."""

    capped: bool
    why_not: str


# -- what `run` sets up --------------------------------------------------------------
def confirmed(fork_server: ForkServerFacts, cgroups: CgroupsMade, job_dirs: JobDirsMade,
              idmap: dict[str, str] | None = None) -> Setup:
    """What the runtime set up, once its fork server is ready: the groups its Cgroups made,
    its job dirs' cap, what the fork server confirmed; and, with job uids, where idmapped
    mounts can be made (probed here unless `idmap` is given)."""
    uids = fork_server.job_uids
    if idmap is None:
        idmap = probe(netns=False, paths=idmap_paths())[2] if uids else {}
    if uids:
        detail = "confirmed by the fork server" + (f"; a private mount view opens {', '.join(fork_server.opened)}"
                                                   if fork_server.opened else "")
    else:
        detail = fork_server.job_uids_error or "jobs run under the supervisor's uid"
    hidden = not fork_server.hide_error
    hidden_detail = (f"{len(fork_server.hidden)} directories: {', '.join(fork_server.hidden)}" if hidden else
                     f"{fork_server.hide_error}; NOT hidden: {', '.join(fork_server.not_hidden)}")
    return Setup(cgroup=cgroups.in_use, tmp_capped=job_dirs.capped, tmp_why=job_dirs.why_not,
                 netns=fork_server.netns, loopback=fork_server.netns and fork_server.loopback, job_uids=uids,
                 job_uids_detail=detail, worker_namespaces=tuple(fork_server.worker_namespaces), idmap=idmap,
                 packages_hidden=hidden, packages_detail=hidden_detail)


def expected(*, cgroup: CgroupHost, tmp_capped: bool, tmp_why: str, netns: bool, loopback: bool,
             job_uids: bool, job_uids_detail: str, idmap: dict[str, str], packages_hidden: bool = False,
             packages_detail: str = "") -> Setup:
    """What `run` would set up where these were measured: the fork server enters a network
    namespace where it can make one, and gives each worker namespaces of its own only with
    job uids too (worker/forkserver.py serve())."""
    return Setup(cgroup=cgroup, tmp_capped=tmp_capped, tmp_why=tmp_why, netns=netns, loopback=netns and loopback,
                 job_uids=job_uids, job_uids_detail=job_uids_detail,
                 worker_namespaces=WORKER_NAMESPACES if job_uids and netns else (), idmap=idmap,
                 packages_hidden=packages_hidden, packages_detail=packages_detail)


def measure(host: Host, job_uids: tuple[int, int] | None = None) -> Setup:
    """What `run` would set up on this host, each piece tried as `run` does it: cgroups found
    where `Cgroups` makes them, a tmpfs mounted where `JobDirs` mounts them, a network namespace
    and idmapped mounts made in a child (so nothing stays), the job uid range checked as `run`
    checks it at start."""
    netns, loopback, idmap = probe(netns=True, paths=idmap_paths() if host.root else [])
    uids, uids_detail = job_uids_check(host, job_uids)
    tmp_capped, tmp_why = tmp_cap_here()
    from supervisor.sandbox.worker_runtime import supervisor_package_dirs

    dirs = supervisor_package_dirs()
    hidden_detail = (f"{len(dirs)} directories: {', '.join(dirs)}" if host.root else
                     f"needs root (a private mount view); NOT hidden: {', '.join(dirs)}")
    return expected(cgroup=detect(), tmp_capped=tmp_capped, tmp_why=tmp_why, netns=netns, loopback=loopback,
                    job_uids=uids, job_uids_detail=uids_detail, idmap=idmap, packages_hidden=host.root,
                    packages_detail=hidden_detail)


def job_uids_check(host: Host, job_uids: tuple[int, int] | None) -> tuple[bool, str]:
    """Would jobs get uids of their own (`job_uids`, or the default range), and can those read
    Python, the venv and the agents? And the detail that says so."""
    if not host.root:
        return False, "jobs would run under the supervisor's uid (job uids need root)"
    lacking = capabilities.missing(capabilities.FOR_JOB_UIDS)
    if lacking:
        return False, (f"jobs would run under the supervisor's uid: job uids need {', '.join(lacking)}, "
                       "which the supervisor lacks; `run` will not start without --allow-shared-uid")
    from shared.reachability import blocked_dirs, unreadable_files
    from supervisor.config import DEFAULT_JOB_UIDS, ConfigError, check_uid_range

    where = "[sandbox] job_uids" if job_uids is not None else "the default range"
    job_uids = job_uids or DEFAULT_JOB_UIDS
    detail = f"uids {job_uids[0]}-{job_uids[1]} ({where}); "
    try:
        check_uid_range(job_uids, "job uids")
    except ConfigError as e:
        return False, detail + f"REFUSED: {e}: `run` will not start"
    needed = [sys.prefix, sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), os.getcwd()]
    files = [os.path.realpath(sys.executable), os.path.join(os.path.dirname(os.__file__), "os.py")]
    closed = sorted(blocked_dirs(needed))
    bad = unreadable_files(files)
    if bad:
        return False, detail + f"NOT readable by them: {', '.join(bad)}: `run` will not start"
    return True, detail + (f"Python and the venv readable through a private mount view that opens "
                           f"{', '.join(closed)}" if closed else "Python and the venv readable as they are")


def idmap_paths() -> list[str]:
    """Where idmapped mounts are tried: the places leased paths most often are."""
    paths = sorted({tempfile.gettempdir(), os.getcwd(), tmp_base(), os.path.expanduser("~")})
    return [p for p in paths if os.path.isdir(p)]


def probe(netns: bool, paths: Sequence[str]) -> tuple[bool, bool, dict[str, str]]:
    """In a child, so that nothing made stays: can a network namespace be entered and its
    loopback brought up, as the fork server does at start (if `netns`)? And for each path,
    "" if an idmapped mount of it can be made (in a mount namespace of the child's own), else
    why not."""
    if not netns and not paths:
        return False, False, {}
    from worker import idmap

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out: dict[str, object] = {"netns": False, "loopback": False}
        try:
            os.close(r)
            if netns and _libc.unshare(CLONE_NEWNET) == 0:
                out["netns"] = True
                out["loopback"] = _loopback_up()
            maps: dict[str, str] = {}
            if paths:
                try:
                    if _libc.unshare(CLONE_NEWNS) != 0:
                        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
                    ns = idmap.userns_fd(0, 0, 65534)
                    maps = {p: idmap.refusal(p, ns) for p in paths}
                except OSError as e:
                    maps = {p: str(e) for p in paths}
            out["idmap"] = maps
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
        result = json.loads(b"".join(chunks) or b"{}")
    except ValueError:
        result = {}
    got = result.get("idmap") if isinstance(result.get("idmap"), dict) else {}
    return (bool(result.get("netns")), bool(result.get("loopback")),
            {p: str(got.get(p, "probe failed")) for p in paths})


def _loopback_up() -> bool:
    """`lo` up in this process's network namespace (SIOCGIFFLAGS, SIOCSIFFLAGS)."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            req = struct.pack("16sh22x", b"lo", 0)
            flags = struct.unpack("16sh22x", fcntl.ioctl(s, 0x8913, req))[1]
            fcntl.ioctl(s, 0x8914, struct.pack("16sh22x", b"lo", flags | 0x1))
        return True
    except OSError:
        return False


# -- the decision -------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    rows: tuple[Layer, ...]  # doctor's table, in its order
    egress_unavailable: str | None  # why jobs with net.fetch get no proxy, or None
    warnings: tuple[str, ...]  # what jobs go without here, for the supervisor's log

    def row(self, name: str) -> Layer:
        return next(r for r in self.rows if r.name == name)

    def used(self, name: str) -> bool:
        return any(r.used for r in self.rows if r.name == name)

    @property
    def every_job(self) -> list[str]:
        """job.accepted's sandbox list for every job, but for what is added per job (PER_JOB)."""
        out: list[str] = []
        for key in JOB_ORDER:
            for r in self.rows:
                if r.used and (r.name == key or (key == "cgroup" and r.name.startswith("cgroup-"))):
                    out += r.job
        return out

    def for_job(self, net_fetch: bool) -> list[str]:
        """A job's whole list: `every_job`, then what the runtime adds when it accepts the job."""
        out = self.every_job
        for key in PER_JOB:
            r = self.row(key)
            if r.used and (key != "egress-proxy" or net_fetch):
                out += r.job
        return out


def egress_unavailable(host: Host, setup: Setup) -> str | None:
    """Why the egress proxy cannot serve jobs here, or None."""
    if not setup.netns:
        return "the workers have no network namespace of their own"
    if not setup.loopback:
        return "the workers' network namespace has no loopback"
    if host.landlock_abi < 4:
        return "Landlock ABI 4 (TCP port rules) is needed to keep jobs' proxy ports apart"
    return None


def decide(host: Host, setup: Setup) -> Decision:
    abi = host.landlock_abi
    cg = setup.cgroup
    ns, own = host.namespaces, setup.worker_namespaces
    shared_netns = setup.netns and "net" not in own
    egress_why = egress_unavailable(host, setup)
    idmap_ok = [p for p, why in setup.idmap.items() if not why]
    idmap_bad = {p: why for p, why in setup.idmap.items() if why}
    if cg.version == "v2" and cg.controllers:
        cg_detail = "a group per worker: memory and pids limited, CPU time counted"
    elif cg.controllers:
        cg_detail = f"a group per worker in {', '.join(cg.controllers)}"
        if not cg.bounds_memory_and_tasks:
            cg_detail += ": memory and tasks NOT limited by the kernel (needs memory and pids)"
    else:
        cg_detail = "no group per worker"
    if cg.why:
        cg_detail += f"; {cg.why}"
    if not host.root:
        idmap_detail = "needs root (job uids)"
    else:
        idmap_detail = "leased paths mounted for the job's uid (fs.read read-only), host files untouched"
        if idmap_ok:
            idmap_detail += f"; works on {', '.join(idmap_ok)}"
        if idmap_bad:
            idmap_detail += ("; NOT on " + ", ".join(f"{p} ({why})" for p, why in idmap_bad.items())
                             + ": a leased path there is usable only where its mode opens it to every uid, else "
                               "the job does not start")
        if not setup.job_uids:
            idmap_detail += "; not used: no job uids"

    def per_worker(space: str, detail: str) -> Layer:
        name = f"{space}ns-per-worker"
        why = "" if space in own else " (made with job uids and a network namespace)"
        return Layer(name, host.root and space in ns, space in own, detail + why, (name,))

    def always(name: str, detail: str) -> Layer:
        return Layer(name, True, True, detail, (name,))

    rows = (
        Layer("landlock", abi > 0, abi > 0, f"ABI {abi}" if abi else "not in this kernel",
              (f"landlock-abi{abi}",)),
        Layer("landlock-net", abi >= 4, abi >= 4,
              "TCP bind refused; connect only to the job's egress port" if abi >= 4 else "needs ABI 4"),
        Layer("landlock-scopes", abi >= 6, abi >= 6, "signals and abstract sockets" if abi >= 6 else "needs ABI 6"),
        Layer("seccomp", host.seccomp_kernel, host.seccomp,
              "deny-list filter (errors, not kills)" if host.seccomp else
              "libseccomp not reachable" if host.seccomp_kernel else "not in this kernel", ("seccomp",)),
        Layer(f"cgroup-{cg.version}", bool(cg.controllers), bool(cg.controllers), cg_detail, tuple(cg.layers)),
        Layer("netns-empty", setup.netns, setup.netns,
              ("only a loopback, no route out: " + ("one shared by all workers" if shared_netns else "one per worker"))
              if setup.netns else "the workers keep the host's network (TCP is still refused by Landlock)",
              ("netns-empty",) if shared_netns else ()),  # else: netns-per-worker
        Layer("egress-proxy", egress_why is None, egress_why is None,
              "net.fetch through the supervisor: plain HTTP checked by full URL; HTTPS CONNECT by scheme, "
              "host and port only (the path is encrypted)" if egress_why is None else
              f"{egress_why}: jobs with net.fetch get no network", ("egress-proxy",)),
        Layer("tmp-size-cap", setup.tmp_capped, setup.tmp_capped,
              "each job's HOME/TMPDIR a tmpfs of its own (--tmp-size, at most half its memory)" if setup.tmp_capped
              else f"{setup.tmp_why or 'not capped'}: job temp dirs are bounded only by the memory cgroup",
              ("tmp-size-cap",)),
        always("private-tmp", "each job's HOME and TMPDIR a directory of its worker's own (0700), emptied after "
                              "each job"),
        Layer("namespaces", bool(ns), setup.netns or bool(own),
              f"kernel has {', '.join(ns) or 'none'}; per worker: {', '.join(own) or 'none'}"
              + ("; one network namespace shared by the workers" if shared_netns else "")
              + "; pid, user: not used (the cgroup finds every task)"),
        per_worker("mnt", "each worker's own mount namespace (its leased paths' idmapped mounts)"),
        per_worker("ipc", "each worker's own SysV/POSIX IPC, gone with it"),
        per_worker("net", "each worker's own network namespace: its loopback holds only its egress port"),
        Layer("seccomp-self-only", host.seccomp, host.seccomp,
              "prlimit64, sched_set*, setpriority, ioprio_set, migrate_pages, move_pages act on the caller "
              "only; process_madvise, pidfd_getfd, kcmp, inotify, fanotify refused", ("seccomp-self-only",)),
        Layer("idmapped-mounts", bool(idmap_ok), setup.job_uids and bool(idmap_ok), idmap_detail,
              ("idmapped-mounts",)),
        Layer("hidden-packages", host.root, setup.packages_hidden,
              ("installed packages that are not the job's agent environment's (the supervisor's venv, the "
               "interpreter's and the system's site-packages) hidden by an empty read-only mount in the fork "
               "server's mount view; the job's import path built for it: " if setup.packages_hidden else
               "the job's import path leaves them out and Landlock keeps the supervisor's venv unreadable, but the "
               "interpreter's own installed packages stay readable: ") + setup.packages_detail,
              ("hidden-packages",)),
        always("rlimits", "cpu, open files, file size, processes (processes: ignored for root)"),
        always("memory-watchdog", "resident size of each job's process tree, every 100 ms"),
        always("no-new-privs", "set before Landlock"),
        always("no-capabilities", "bounding, ambient, effective, permitted and inheritable sets emptied"),
        always("process-group", "each worker in its own session; dies with the supervisor"),
        always("parent-death-signal", "each worker killed when the fork server goes, and it when the supervisor does"),
        always("scrubbed-env", "PATH, LANG, LC_*, TZ; HOME and TMPDIR private"),
        Layer("root", host.root, host.root, "supervisor runs as root" if host.root else "supervisor is unprivileged"),
        Layer("job-uids", host.own_uids, setup.job_uids,
              setup.job_uids_detail or ("" if host.own_uids else "jobs run under the supervisor's uid (job uids "
                                                                   "need root and CAP_SETUID, CAP_SETGID, "
                                                                   "CAP_SYS_ADMIN)"), ("job-uids",)),
        Layer("shared-uid", not host.own_uids, not host.own_uids and not setup.job_uids,
              "jobs run under the supervisor's own uid (accepted with --allow-shared-uid; `run` refuses otherwise)"
              if not host.own_uids else "jobs have uids of their own", ("shared-uid",)),
        Layer("container", host.container, False, "inside a container" if host.container else "not a container"),
    )
    warnings = []
    if not abi:
        warnings.append("Landlock is not available on this kernel: jobs run without filesystem isolation")
    if not host.seccomp:
        warnings.append(("libseccomp is not available" if host.seccomp_kernel else "the kernel has no seccomp")
                        + ": jobs run without a seccomp filter")
    if not setup.netns:
        warnings.append("jobs share the host's network namespace (TCP is still refused by Landlock)")
    if egress_why:
        warnings.append(f"no egress proxy: {egress_why}; jobs with net.fetch get no network")
    if not setup.packages_hidden:
        warnings.append(f"installed packages are not hidden from jobs ({setup.packages_detail}): they cannot "
                        "import them, but can read the interpreter's own site-packages")
    if setup.job_uids and not idmap_ok:
        warnings.append(f"no idmapped mounts ({idmap_detail})")
    return Decision(rows, egress_why, tuple(warnings))


__all__ = ["Decision", "Host", "JOB_ORDER", "Layer", "PER_JOB", "Setup", "confirmed", "decide", "egress_unavailable",
           "expected", "measure"]
