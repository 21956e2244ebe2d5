"""A worker's sandbox, set up for each job between the lease's arrival and the agent's import.

Layers (each one degrades loudly: `describe()` names what is active):
  - rlimits: CPU time (SIGXCPU ends the worker), open files, file size, processes;
  - no_new_privs;
  - Landlock: the filesystem is read-only where running Python needs it, the job's
    `fs.read` roots are readable, its private temp dir and `fs.write` roots writable,
    and nothing else is reachable; TCP bind is refused and TCP connect allowed only to
    the job's egress proxy port (with `net.fetch`; else to nothing), and
    where the ABI has scopes, signals and abstract sockets stay inside the job.

The Landlock binding is a few raw syscalls through ctypes: the PyPI bindings are
pre-releases that lag the kernel ABI (no scopes, no IOCTL_DEV), and the kernel's
interface is three stable syscalls.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from collections.abc import Iterable
from typing import Any

from shared import capabilities
from shared.exit_codes import BOOT_ERROR
from shared.landlock import SYS_LANDLOCK_CREATE_RULESET, landlock_abi
from worker import idmap, seccomp_filter, seccomp_self

SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_RULE_PATH_BENEATH, LANDLOCK_RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38

# Filesystem access rights, by the ABI that introduced them.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2

READ = EXECUTE | READ_FILE | READ_DIR
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
WRITE = READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | REFER | TRUNCATE

# What running Python needs to read, beside the interpreter's own prefixes.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime",
               "/etc/locale.alias", "/etc/ssl", "/etc/ca-certificates", "/etc/nsswitch.conf", "/etc/passwd",
               "/etc/group", "/etc/mime.types", "/dev/urandom", "/dev/random", "/dev/zero", "/proc/self",
               "/proc/thread-self", "/sys/devices/system/cpu")
DEV_WRITE = ("/dev/null",)

_libc = ctypes.CDLL(None, use_errno=True)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def lease_roots(patterns: Iterable[str]) -> list[str]:
    """Directory roots of glob patterns: the part before the first segment with a `*`.

    The kernel rule is the root; the supervisor still matches the exact pattern.
    A root that does not exist yet (a file the job will create) is its parent.
    """
    roots = []
    for p in patterns:
        if not p.startswith("/"):
            continue
        fixed = []
        for seg in p.split("/")[1:]:
            if "*" in seg:
                break
            fixed.append(seg)
        root = os.path.realpath("/" + "/".join(fixed))
        while not os.path.exists(root) and root != "/":
            root = os.path.dirname(root)
        roots.append(root)
    return roots


# Prepared once by the fork server, inherited by every worker (see `prepare`):
SECCOMP_BPF: bytes | None = None  # the seccomp filter as BPF (None: libseccomp missing)
PRIVILEGES_DROPPED = False  # capabilities emptied and no_new_privs set in the fork server
LANDLOCK_ABI = landlock_abi()
_READ_DIRS: dict[str, list[str]] = {}  # agent module -> what its jobs may read besides the lease


SETID_KEPT = False  # the fork server kept what each worker needs to take its job's uid (see `prepare`)
SELF_FILTER: tuple[int, dict[str, int]] | None = None  # arch and numbers for seccomp_self
PARENT = 0  # the fork server's pid, which each worker must die with
KEPT_FOR_JOB_UIDS = capabilities.mask([*capabilities.FOR_JOB_UIDS, capabilities.CAP_NET_ADMIN])
PR_SET_PDEATHSIG = 1
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x08000000, 0x40000000
MS_REC, MS_SLAVE = 0x4000, 1 << 19


def prepare(agent_modules: list[str], agent_dirs: Any, keep_setid: bool = False,
            shared_netns: bool = True) -> None:
    """In the fork server: everything about the sandbox that is the same for every job.

    With `keep_setid` (job uids), CAP_SETUID, CAP_SETGID, CAP_SYS_ADMIN and CAP_NET_ADMIN
    stay in the effective and permitted sets, those of them it holds (nothing else; the bounding set is emptied):
    the fork server needs them to reach into a worker's network namespace for its egress
    port, and each worker to make its namespaces and its leased paths' idmapped mounts,
    before it trades them all for its job's uid, which clears them. With `shared_netns`
    (workers without a network namespace of their own), the filter also refuses listen()."""
    global SECCOMP_BPF, PRIVILEGES_DROPPED, SETID_KEPT, SELF_FILTER
    from worker.seccomp_filter import build_bpf

    SECCOMP_BPF = build_bpf(refuse_listen=shared_netns)
    SELF_FILTER = seccomp_self.resolve() if SECCOMP_BPF is not None else None
    for module in agent_modules:
        _READ_DIRS[module] = python_read_dirs(agent_dirs(module))
    # Only what it holds: without CAP_NET_ADMIN (a container that drops it) the workers' loopback
    # stays down and jobs with net.fetch get no network, as `doctor` says; the rest is unchanged.
    drop_capabilities(keep=KEPT_FOR_JOB_UIDS & capabilities.held("CapPrm") if keep_setid else 0)
    _no_new_privs()
    PRIVILEGES_DROPPED = True
    SETID_KEPT = keep_setid


def enter_worker_namespaces() -> None:
    """In a new worker, before any job: a mount, IPC and network namespace of its own.

    The mount namespace holds its leased paths' idmapped mounts (every mount a slave, so
    the supervisor's later mounts still arrive and none of the worker's leaves); the IPC
    namespace keeps SysV and POSIX message queues (and shared memory charged to the
    worker's cgroup) to this worker and gone with it; the network namespace has not even
    a loopback until the fork server opens the job's egress port in it."""
    if _libc.unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(mount, IPC, network) failed")
    if _libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None) != 0:
        raise OSError(ctypes.get_errno(), "making the worker's mounts slaves failed")


def become(uid: int) -> None:
    """Take the job's uid (and the same gid, no supplementary groups). Changing every uid
    away from 0 clears all capabilities (checked: the worker exits if one is left); it also
    clears the parent-death signal, so that is set again, and the parent checked once more
    in case it died in between."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    left = capabilities_held()
    if left:
        raise OSError(0, f"capabilities {left:#x} still held after taking uid {uid}")
    set_parent_death_signal(PARENT)


def capabilities_held() -> int:
    """The permitted set of this process (0: none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapPrm:"):
                return int(line.split()[1], 16)
    return 0


def set_parent_death_signal(expected_parent: int) -> None:
    """Die with SIGKILL when the parent goes; exit now if it is already gone."""
    if _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if expected_parent and os.getppid() != expected_parent:
        os._exit(BOOT_ERROR)


def read_dirs_for(module: str, agent_dirs: Any) -> list[str]:
    dirs = _READ_DIRS.get(module)
    if dirs is None:
        dirs = _READ_DIRS[module] = python_read_dirs(agent_dirs(module))
    return dirs


class Sandbox:
    """Applies and describes one job's sandbox in this process."""

    def __init__(self) -> None:
        self.abi = LANDLOCK_ABI
        self.landlocked = False
        self.layers: list[str] = []
        self.idmapped: list[str] = []  # leased paths mounted for the job's uid

    def apply(self, spec: dict[str, Any], read_dirs: list[str], jobs_left: int = 1) -> None:
        limits = spec.get("limits") or {}
        self._rlimits(limits, jobs_left)
        if self.landlocked:
            return  # a reused worker: same lease, same rules (the supervisor's reuse key)
        only_thread()
        if not PRIVILEGES_DROPPED:
            drop_capabilities()
            _no_new_privs()
        lease = spec.get("lease") or {}
        read_roots = lease_roots(lease.get("fs.read", []))
        write_roots = lease_roots(lease.get("fs.write", []))
        uid = spec.get("uid")
        if uid is not None:
            self.idmapped = idmap.mount_for_uid(idmap.plan(read_roots, write_roots), int(uid))
            become(int(uid))
        elif SETID_KEPT:
            drop_capabilities()  # no uid for this job: give up the kept ones
        tmp = spec.get("tmp_dir")
        if self.abi:
            read = list(read_dirs) + read_roots
            write = write_roots + ([tmp] if tmp else []) + list(DEV_WRITE)
            port = spec.get("egress_port")
            self._landlock(read, write, [int(port)] if port else [])
        if SECCOMP_BPF is not None:
            seccomp_filter.load(SECCOMP_BPF)
            if SELF_FILTER is not None:  # last: nothing after it needs what they refuse
                seccomp_filter.load(seccomp_self.build(*SELF_FILTER, os.getpid()))
        self.landlocked = True

    def _rlimits(self, limits: dict[str, int], jobs_left: int) -> None:
        def lower(which: int, value: int) -> None:
            soft, hard = resource.getrlimit(which)
            hard = value if hard == resource.RLIM_INFINITY else min(hard, value)
            resource.setrlimit(which, (min(value, hard), hard))

        if "cpu_sec" in limits:
            used = resource.getrusage(resource.RUSAGE_SELF)
            spent = int(used.ru_utime + used.ru_stime)  # a reused worker has spent some already
            soft = spent + int(limits["cpu_sec"])
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            if hard == resource.RLIM_INFINITY:  # first job: room for every job this worker may run
                hard = spent + int(limits["cpu_sec"]) * jobs_left + 2
            resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))  # SIGXCPU, then SIGKILL
        if self.landlocked:
            return  # a reused worker: the other limits are the same (the supervisor's reuse key)
        if "max_open_files" in limits:
            lower(resource.RLIMIT_NOFILE, int(limits["max_open_files"]))
        if "max_file_size_mb" in limits:
            lower(resource.RLIMIT_FSIZE, int(limits["max_file_size_mb"]) * 1024 * 1024)
        if "max_procs" in limits:
            lower(resource.RLIMIT_NPROC, int(limits["max_procs"]))

    def _landlock(self, read: list[str], write: list[str], connect_ports: list[int]) -> None:
        fs_all = FS_BY_ABI.get(self.abi, FS_BY_ABI[5])
        attr = _RulesetAttr(fs_all, NET_BIND_TCP | NET_CONNECT_TCP if self.abi >= 4 else 0,
                            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if self.abi >= 6 else 0)
        size = ctypes.sizeof(_RulesetAttr) if self.abi >= 6 else (16 if self.abi >= 4 else 8)
        ruleset = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                ctypes.c_uint32(0))
        if ruleset < 0:
            raise OSError(ctypes.get_errno(), "landlock_create_ruleset failed")
        try:
            for path, access in [(p, READ) for p in read] + [(p, WRITE) for p in write]:
                self._allow(ruleset, path, access & fs_all)
            for port in connect_ports if self.abi >= 4 else []:  # the job's egress proxy, nothing else
                rule = _NetPort(NET_CONNECT_TCP, port)
                if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, ctypes.c_int(LANDLOCK_RULE_NET_PORT),
                                 ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for TCP port {port}")
            if _libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), "landlock_restrict_self failed")
        finally:
            os.close(ruleset)

    @staticmethod
    def _allow(ruleset: int, path: str, access: int) -> None:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # absent on this host: nothing to allow
        try:
            if not os.path.isdir(path):
                access &= FILE_RIGHTS
            rule = _PathBeneath(access, fd)
            if _libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                             ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule failed for {path}")
        finally:
            os.close(fd)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}


def only_thread() -> None:
    """The sandbox is applied by the worker's one thread: Landlock (and capset) hold only for
    the thread that applies them and the threads it makes afterwards, so another thread would
    be left outside. OSError (the job does not run) if there is one."""
    tasks = os.listdir("/proc/self/task")
    if len(tasks) != 1:
        raise OSError(0, f"the worker has {len(tasks)} threads when its sandbox is applied: only the one "
                         f"applying it would be confined")


def drop_capabilities(keep: int = 0) -> None:
    """Leave no capability (but those in the `keep` mask, effective and permitted only):
    bounding set, ambient set, then the three sets."""
    sysno = _SYS_CAPSET.get(os.uname().machine)
    if sysno is None:
        raise OSError(0, f"capset number unknown on {os.uname().machine}")
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except OSError:
        last = 40
    for cap in range(last + 1):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # EPERM without CAP_SETPCAP: nothing to drop then
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = keep & 0xFFFFFFFF
    data[1].effective = data[1].permitted = keep >> 32
    if _libc.syscall(sysno, ctypes.byref(header), ctypes.byref(data)) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _no_new_privs() -> None:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


ENVIRONMENT_READ: list[str] = []  # the agent environment's own directories (configure_environment)
OWN_PREFIX = False  # jobs may read this interpreter's prefix (an agent's venv), not only its base


def configure_environment(dirs: Iterable[str], own_prefix: bool) -> None:
    """In the fork server, once: the directories every job of this agent environment reads
    (the worker runtime's copy, the environment's import directories), and whether its
    interpreter's prefix is the agent's (its venv) or the supervisor's (never read)."""
    global OWN_PREFIX
    ENVIRONMENT_READ[:] = [os.path.realpath(d) for d in dirs]
    OWN_PREFIX = own_prefix


def python_read_dirs(agent_dirs: Iterable[str]) -> list[str]:
    """Everything a job may read besides its lease: the interpreter's installation, the worker
    runtime, its agent environment's directories, system files, its agent's directory. The
    supervisor's own venv is not among them (OWN_PREFIX is off for the supervisor's
    interpreter, whose prefix is that venv)."""
    import shared
    import worker

    dirs = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
            os.path.dirname(os.path.abspath(worker.__file__)), os.path.dirname(os.path.abspath(shared.__file__))}
    if OWN_PREFIX:
        dirs |= {sys.prefix, sys.exec_prefix}
    dirs |= {os.path.realpath(d) for d in list(dirs)}
    return sorted(dirs | set(SYSTEM_READ) | set(ENVIRONMENT_READ) | set(agent_dirs))
