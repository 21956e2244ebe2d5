#!/usr/bin/env python3
"""The cost of the sandbox, layer by layer: each layer's per-job set-up time.

    python scripts/bench_lib/layers.py [--reps 5] [--n 300] [--quick] [--agent-module examples.agents]
                                       [--only KEY,KEY] [--uid UID] [--out FILE]

One warm process plays the fork server: it imports what the fork server imports, precompiles
the agent module, builds the seccomp BPF, resolves the second (self-only) filter's syscall
numbers and the agent's read dirs once (as `sandbox.prepare` does), enters the private mount
view in which job uids can reach Python and the agents (`forkserver.open_up_for_job_uids`, as
the fork server does with job uids on), freezes the collector, and keeps its capabilities (it
also plays the supervisor, which moves workers into cgroups). For each sample it forks a child
that waits on a pipe, lets the parent do the parent's part (the cgroup join: writing the child's
pid into cgroup.procs), then applies one layer with the project's own code, timed inside the
child with perf_counter_ns and sent back through a pipe, and exits with os._exit(0). The parent
also times fork -> reaped.

Layers (per job in this design):
  baseline       fork -> reaped of a child that applies nothing (same pipe handshake)
  rlimits        Sandbox._rlimits with the default limits (cpu, open files, file size, procs)
  cgroup-join    a recycled group (Cgroups.reserve), its memory+pids cgroup.procs written with the pid
                 (a worker writes them itself right after fork; the kernel's attach is the same)
  cgroup-new     Cgroups.reserve when no group is free (mkdir memory+pids, then join), then set_limits
  caps-nnp       drop_capabilities + no_new_privs (once in the fork server in this design, not per job)
  landlock       Sandbox.apply's Landlock part: read dirs + lease roots + tmp dir, restrict_self
  seccomp        seccomp_filter.load of build_bpf()
  seccomp-self   seccomp_filter.load(seccomp_self.build(arch, numbers, getpid())): the second filter,
                 built per worker for its own pid (the numbers resolved once, as `prepare` does)
  worker-ns      sandbox.enter_worker_namespaces(): unshare of mount + IPC + network namespaces and /
                 made a recursive slave, as each worker does right after fork (once per worker, off
                 the job's critical path with a warm pool; the kernel tears them down at its exit,
                 which fork -> reaped includes where it is synchronous)
  idmap          in a worker that entered its namespaces (untimed), idmap.mount_for_uid(idmap.plan(
                 [root], []), uid) for one leased root (a 0700 root-owned directory under /tmp): what a
                 job with an fs.read lease pays under job uids
  userns         in the same state, idmap.userns_fd(0, 0, uid) alone (a short-lived child makes the
                 user namespace whose maps the mount uses): the idmap's share that is a fork
  all            cgroup join (parent), then Sandbox.apply: rlimits, caps + no_new_privs, Landlock, seccomp
                 (both filters)
  all-deployed   the same with capabilities and no_new_privs already dropped (as the fork server does
                 without job uids)
  all-deployed-uid, all-deployed-uid-nolease
                 as deployed with job uids: the child holds only sandbox.KEPT_FOR_JOB_UIDS (with
                 no_new_privs) and enters its worker namespaces untimed, as the fork server's child
                 does; then the cgroup join and Sandbox.apply of a spec with "uid" (idmapped mounts of
                 the lease roots, become(uid), Landlock, both filters), with an fs.read lease root and
                 without one
For reference (what the issue quotes for namespaces and mounts):
  netns          unshare(CLONE_NEWNET) in the child
  ipcns          unshare(CLONE_NEWIPC) in the child
  mntns          unshare(CLONE_NEWNS) and / made a recursive slave (mount_ns's and the workers' way)
  pidns          unshare(CLONE_NEWPID) + fork of an init (which exits at once, reaped untimed)
  clone, clone-newpid
                 a raw clone() of an init vs a raw clone() with CLONE_NEWPID: the namespace's own
                 cost, without Python's fork (its at-fork handlers)
  tmpfs          from the parent, under /dev/shm: mkdir, mount tmpfs (size=64m,mode=0700),
                 umount2(MNT_DETACH), rmdir

Set-up is the first application in a fresh fork: the copy-on-write page faults it takes are
included, as a fresh worker pays them (their count is reported). Where a layer can be applied
again, a twin variant applies it twice in one child: its second time is the warm cost (the layer
without the faults; a second capability drop finds nothing left to drop, a second Landlock domain
or seccomp filter stacks on the first). Children whose layer needs no_new_privs (landlock,
seccomp, seccomp-self, all-deployed) drop capabilities and set no_new_privs before the handshake,
untimed, like a worker forked from the fork server; so do worker-ns's (keeping KEPT_FOR_JOB_UIDS);
their fork -> reaped is compared with caps-nnp's. idmap's, userns's and the all-deployed-uid
variants' children also enter the worker namespaces untimed: theirs is compared with worker-ns's.
The others' is compared with baseline's (clone-newpid's with clone's). The kernel frees a network
or IPC namespace (and a user namespace) from a work queue after the last process leaves it: that
part of their teardown is CPU spent outside fork -> reaped. Samples are interleaved
(each round runs every layer once, in a shuffled order). Per layer: the median of each
repetition's samples, then min/median/max over repetitions, in microseconds. Cgroups
(arcp-layers-bench-PID*), the job dirs and the mount points (/dev/shm/arcp-layers-bench-PID) and
the leased root (/tmp/arcp-layers-bench-PID-lease-*) are removed at the end, also on error; the
private mount view and every idmapped mount live in namespaces of this process and its children,
and go with them. Needs root (or CAP_SYS_ADMIN) for cgroups, namespaces and mounts; a layer that
cannot run here is reported as unavailable.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import platform
import random
import resource
import select
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # as the fork server puts its working directory first

# Warm like the fork server: the same imports (importing it runs nothing but imports).
import worker.forkserver  # noqa: F401
from supervisor.sandbox import cgroup_host, cgroups, worker_cgroup
from supervisor.config import Limits
from worker import idmap, sandbox, seccomp_filter, seccomp_self
from worker.agent_loader import precompile
from worker.forkserver import open_up_for_job_uids
from worker.runner import agent_dirs

NAME = f"arcp-layers-bench-{os.getpid()}"
SHM = "/dev/shm"
CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWIPC, CLONE_NEWNS = 0x40000000, 0x20000000, 0x08000000, 0x00020000
MS_REC, MS_SLAVE = 0x4000, 1 << 19
JOB_UID = 1900000000  # a job uid for the uid variants (as from the supervisor's pool)
SIGCHLD = 17
SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
MS_NOSUID, MS_NODEV, MNT_DETACH = 0x2, 0x4, 0x2
TMPFS_OPTS = b"size=64m,mode=0700"
TIMEOUT = 10.0  # seconds any one sample may take
_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _reap(pid: int, timeout: float) -> int:
    """waitpid, bounded: SIGKILL and raise if the process has not ended in `timeout` seconds."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            select.select([pidfd], [], [], 5.0)
            os.waitpid(pid, os.WNOHANG)
            raise TimeoutError(f"child {pid} did not exit within {timeout} s")
        return os.waitpid(pid, 0)[1]
    finally:
        os.close(pidfd)


def _read_to_eof(fd: int, deadline: float) -> bytes:
    out = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError("no answer from the child")
        chunk = os.read(fd, 4096)
        if not chunk:
            return out
        out += chunk


class BenchCgroups(cgroups.Cgroups):
    """The supervisor's Cgroups under a name of our own (and without its sweep of stale
    `arcp-supervisor-*` groups, which are not ours to touch)."""

    def __init__(self, name: str) -> None:
        self.mode = "none"
        self.bases = {}
        self._free = []
        self._made = 0
        if os.path.exists(os.path.join(cgroup_host.V2_ROOT, "cgroup.controllers")):
            self._init_v2(name)
        else:
            self._init_v1(name)


@dataclass
class Variant:
    key: str
    child_prep: Callable[[], None] | None = None  # in the child, untimed, before the handshake
    child_step: Callable[[], int | None] | None = None  # in the child, timed (or returns its own ns)
    parent_step: Callable[[int], dict[str, int]] | None = None  # in the parent, before the go byte
    after: Callable[[], None] | None = None  # in the parent, untimed, after the child is reaped
    fork: bool = True
    twice: bool = False  # apply the child's step a second time, timed apart (its warm cost)
    samples: list[list[dict[str, int]]] = field(default_factory=list)  # per rep
    error: str | None = None


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    variant: str
    parts: tuple[str, ...]  # summed: the set-up time (empty: no set-up, fork -> reaped only)
    timed_in: str
    ref: str | None  # the variant whose fork -> reaped this one's is compared with
    warm: str | None = None  # the variant that applies the layer twice: its second time is the warm cost


ROWS = [
    Row("baseline", "fork → reaped, nothing applied", "baseline", (), "parent", None),
    Row("rlimits", "rlimits (Sandbox._rlimits, default limits)", "rlimits", ("child",), "child", "baseline",
        "rlimits-2x"),
    Row("cgroup-join", "cgroup join, recycled group (reserve, then pid → memory+pids cgroup.procs)",
        "cgroup-join", ("join",), "parent", "baseline"),
    Row("cgroup-new", "cgroup join, new group (mkdir memory+pids, then join)", "cgroup-new", ("join",),
        "parent", "baseline"),
    Row("cgroup-limits", "cgroup set_limits on a new group (memory, memsw, pids.max)", "cgroup-new",
        ("limits",), "parent", None),
    Row("caps-nnp", "drop_capabilities + no_new_privs (once, in the fork server)", "caps-nnp", ("child",),
        "child", "baseline", "caps-nnp-2x"),
    Row("landlock", "Landlock (Sandbox.apply: read dirs + lease roots + tmp dir, restrict_self)",
        "landlock", ("child",), "child", "caps-nnp", "landlock-2x"),
    Row("seccomp", "seccomp (seccomp_filter.load of build_bpf())", "seccomp", ("child",), "child", "caps-nnp",
        "seccomp-2x"),
    Row("seccomp-self", "seccomp, second filter (seccomp_self.build for the pid + seccomp_filter.load)",
        "seccomp-self", ("child",), "child", "caps-nnp", "seccomp-self-2x"),
    Row("worker-ns", "worker namespaces (enter_worker_namespaces: mount+IPC+net, / rslave; once per worker)",
        "worker-ns", ("child",), "child", "caps-nnp", "worker-ns-2x"),
    Row("idmap", "idmapped mount of one fs.read root (idmap.mount_for_uid; in a worker's namespaces)",
        "idmap", ("child",), "child", "worker-ns"),
    Row("userns", "of which: idmap.userns_fd (fork of a child that makes the user namespace)", "userns",
        ("child",), "child", "worker-ns", "userns-2x"),
    Row("all", "all, worker order: cgroup join + Sandbox.apply (rlimits, caps+nnp, Landlock, seccomp)",
        "all", ("join", "child"), "parent+child", "baseline", "all-2x"),
    Row("all-deployed", "all, caps+nnp already dropped by the fork server (as deployed, no job uids)",
        "all-deployed", ("join", "child"), "parent+child", "caps-nnp", "all-deployed-2x"),
    Row("all-deployed-uid", "all with a job uid, in worker namespaces: join + Sandbox.apply (rlimits, idmapped "
        "fs.read root, become, Landlock, both filters)", "all-deployed-uid", ("join", "child"), "parent+child",
        "worker-ns"),
    Row("all-deployed-uid-nolease", "the same, no fs.read lease (no idmapped mount)", "all-deployed-uid-nolease",
        ("join", "child"), "parent+child", "worker-ns"),
    Row("netns", "ref: unshare(CLONE_NEWNET)", "netns", ("child",), "child", "baseline",
        "netns-2x"),
    Row("ipcns", "ref: unshare(CLONE_NEWIPC)", "ipcns", ("child",), "child", "baseline", "ipcns-2x"),
    Row("mntns", "ref: unshare(CLONE_NEWNS) + / made a recursive slave", "mntns", ("child",), "child", "baseline",
        "mntns-2x"),
    Row("pidns", "ref: unshare(CLONE_NEWPID) + fork of an init", "pidns", ("child",), "child", "baseline"),
    Row("clone", "ref: raw clone() of an init, no namespace", "clone", ("child",), "child", "baseline"),
    Row("clone-newpid", "ref: raw clone(CLONE_NEWPID) of an init", "clone-newpid", ("child",), "child",
        "clone"),
    Row("tmpfs-mount", "ref: mount tmpfs under /dev/shm (size=64m,mode=0700)", "tmpfs", ("mount",), "parent", None),
    Row("tmpfs-cycle", "ref: tmpfs mkdir + mount + umount2(MNT_DETACH) + rmdir", "tmpfs", ("cycle",), "parent",
        None),
]


class Bench:
    """Everything prepared once, as in the fork server, and the layers' steps."""

    def __init__(self, agent_module: str, base: str, lease_root: str, uid: int) -> None:
        """`base`: /dev/shm/arcp-layers-bench-PID, the jobs' tmp dirs and the mount points (made
        by the caller, who removes it if this fails); `lease_root`: the uid variants' leased
        directory (0700, root's). Cgroups are made last: nothing else here needs undoing."""
        self.base = base
        self.current: worker_cgroup.WorkerCgroup | None = None
        self.stuck: list[worker_cgroup.WorkerCgroup] = []
        self.mount_n = 0
        os.chmod(base, 0o711)  # as the supervisor's job dirs' root: a job uid reaches its own dir only
        self.job_tmp = os.path.join(base, "job")
        os.makedirs(os.path.join(self.job_tmp, "out"), 0o700)
        self.limits = Limits()
        self.spec: dict[str, Any] = {
            "limits": self.limits.as_wire(),
            "lease": {"fs.read": [f"{ROOT}/examples/**"], "fs.write": [f"{self.job_tmp}/out/**"]},
            "tmp_dir": self.job_tmp,
        }
        self.spec_no_limits = {k: v for k, v in self.spec.items() if k != "limits"}
        # A job under a uid of its own: its tmp dir is its (as JobRunner._job_uid makes it).
        self.uid = uid
        self.lease_root = lease_root
        self.uid_tmp = os.path.join(base, "job-uid")
        os.mkdir(self.uid_tmp, 0o700)
        os.chown(self.uid_tmp, uid, uid)
        self.spec_uid_nolease: dict[str, Any] = {"limits": self.limits.as_wire(), "lease": {},
                                                 "tmp_dir": self.uid_tmp, "uid": uid}
        self.spec_uid = {**self.spec_uid_nolease, "lease": {"fs.read": [f"{lease_root}/**"]}}
        precompile([agent_module])
        self.bpf = seccomp_filter.build_bpf()
        t0 = time.perf_counter_ns()
        self.self_filter = seccomp_self.resolve() if self.bpf is not None else None
        self.resolve_ns = time.perf_counter_ns() - t0
        # As `prepare` does; capabilities stay (we join cgroups, mount).
        sandbox.SECCOMP_BPF = self.bpf
        sandbox.SELF_FILTER = self.self_filter
        self.read_dirs = sandbox.read_dirs_for(agent_module, agent_dirs)
        self.sandbox = sandbox.Sandbox()  # never applied here: each child applies its own copy
        self.landlock_abi = self.sandbox.abi
        # The fork server's private view with job uids on (in this process's own mount namespace).
        self.uid_facts = open_up_for_job_uids([agent_module])
        self.reused = BenchCgroups(NAME)
        try:
            self.fresh = BenchCgroups(f"{NAME}-new")
        except BaseException:
            self.reused.close()
            raise

    # -- in the child -----------------------------------------------------------
    @staticmethod
    def prep_dropped() -> None:
        """The state a worker inherits from the fork server: no capability, no_new_privs."""
        sandbox.drop_capabilities()
        sandbox._no_new_privs()
        sandbox.PRIVILEGES_DROPPED = True

    @staticmethod
    def prep_kept() -> None:
        """The state a worker inherits from the fork server with job uids on: only the
        capabilities it needs to take its job's uid, and no_new_privs."""
        sandbox.drop_capabilities(keep=sandbox.KEPT_FOR_JOB_UIDS)
        sandbox._no_new_privs()
        sandbox.PRIVILEGES_DROPPED = True
        sandbox.SETID_KEPT = True

    def prep_worker(self) -> None:
        """A worker forked with job uids on, before its first job: its own namespaces entered."""
        if not self.uid_facts.get("job_uids"):
            raise OSError(0, f"job uids unavailable: {self.uid_facts.get('job_uids_error', 'no private view')}")
        self.prep_kept()
        sandbox.enter_worker_namespaces()

    def step_rlimits(self) -> None:
        self.sandbox._rlimits(self.spec["limits"], 1)

    @staticmethod
    def step_caps() -> None:
        sandbox.drop_capabilities()
        sandbox._no_new_privs()

    def prep_landlock(self) -> None:
        if not self.landlock_abi:
            raise OSError(0, "Landlock unavailable")
        self.prep_dropped()
        sandbox.SECCOMP_BPF = None  # Landlock only: no limits (below), no seccomp

    def step_landlock(self) -> None:
        sandbox.Sandbox().apply(self.spec_no_limits, self.read_dirs, 1)

    def step_seccomp(self) -> None:
        if self.bpf is None:
            raise OSError(0, "libseccomp unavailable")
        seccomp_filter.load(self.bpf)

    def step_seccomp_self(self) -> None:
        if self.self_filter is None:
            raise OSError(0, "libseccomp unavailable")
        seccomp_filter.load(seccomp_self.build(*self.self_filter, os.getpid()))

    @staticmethod
    def step_worker_ns() -> None:
        sandbox.enter_worker_namespaces()

    def step_idmap(self) -> None:
        done = idmap.mount_for_uid(idmap.plan([self.lease_root], []), self.uid)
        if done != [self.lease_root]:
            raise OSError(0, f"idmapped mounts made: {done}, expected [{self.lease_root}]")

    def step_userns(self) -> None:
        os.close(idmap.userns_fd(0, 0, self.uid))

    def step_all_uid(self) -> None:
        sandbox.Sandbox().apply(self.spec_uid, self.read_dirs, 1)

    def step_all_uid_nolease(self) -> None:
        sandbox.Sandbox().apply(self.spec_uid_nolease, self.read_dirs, 1)

    def prep_all(self) -> None:
        sandbox.PRIVILEGES_DROPPED = False

    def step_all(self) -> None:
        sandbox.Sandbox().apply(self.spec, self.read_dirs, 1)

    @staticmethod
    def step_netns() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")

    @staticmethod
    def step_ipcns() -> None:
        _check(_libc.unshare(CLONE_NEWIPC), "unshare(CLONE_NEWIPC)")

    @staticmethod
    def step_mntns() -> None:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(_libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None), "making / a recursive slave")

    @staticmethod
    def step_pidns() -> int:
        t0 = time.perf_counter_ns()
        _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
        pid = os.fork()
        if pid == 0:
            os._exit(0)  # the namespace's init
        ns = time.perf_counter_ns() - t0
        _reap(pid, TIMEOUT)
        return ns

    @staticmethod
    def _clone(flags: int) -> int:
        if SYS_CLONE is None:
            raise OSError(0, f"clone's number unknown on {platform.machine()}")
        t0 = time.perf_counter_ns()
        pid = _libc.syscall(SYS_CLONE, ctypes.c_ulong(flags | SIGCHLD), ctypes.c_ulong(0), ctypes.c_ulong(0),
                            ctypes.c_ulong(0), ctypes.c_ulong(0))
        if pid == 0:
            os._exit(0)  # nothing of Python's after-fork work: out at once
        ns = time.perf_counter_ns() - t0
        if pid < 0:
            raise OSError(ctypes.get_errno(), f"clone: {os.strerror(ctypes.get_errno())}")
        _reap(pid, TIMEOUT)
        return ns

    def step_clone(self) -> int:
        return self._clone(0)

    def step_clone_newpid(self) -> int:
        return self._clone(CLONE_NEWPID)

    # -- in the parent ----------------------------------------------------------
    def _join(self, cgs: BenchCgroups, pid: int) -> tuple[worker_cgroup.WorkerCgroup, int]:
        if not cgs.bases:
            raise OSError(0, "no writable cgroup hierarchy (memory/pids)")
        t0 = time.perf_counter_ns()
        cg = cgs.reserve()
        if cg is None:
            raise OSError(0, "Cgroups.reserve failed (see the warning above)")
        for path in cg.procs_files():  # what a worker writes ("0") right after fork: the same attach
            with open(path, "w") as f:
                f.write(str(pid))
        ns = time.perf_counter_ns() - t0
        self.current = cg
        return cg, ns

    def parent_join(self, pid: int) -> dict[str, int]:
        return {"join": self._join(self.reused, pid)[1]}

    def parent_join_or_none(self, pid: int) -> dict[str, int]:
        return self.parent_join(pid) if self.reused.bases else {}

    def parent_new(self, pid: int) -> dict[str, int]:
        cg, ns = self._join(self.fresh, pid)
        t0 = time.perf_counter_ns()
        cg.set_limits(self.limits.memory, self.limits.max_procs)
        return {"join": ns, "limits": time.perf_counter_ns() - t0}

    def after_reused(self) -> None:
        cg, self.current = self.current, None
        if cg is not None and not self.reused.recycle(cg):
            self.stuck.append(cg)

    def after_new(self) -> None:
        cg, self.current = self.current, None
        if cg is not None and not cg.remove():
            cg.kill_all()
            self.stuck.append(cg)

    def parent_tmpfs(self, _pid: int) -> dict[str, int]:
        self.mount_n += 1
        path = os.path.join(self.base, f"m{self.mount_n}")
        mounted = False
        t0 = time.perf_counter_ns()
        os.mkdir(path, 0o700)
        try:
            t1 = time.perf_counter_ns()
            _check(_libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, TMPFS_OPTS), "mount tmpfs")
            mounted = True
            t2 = time.perf_counter_ns()
            _check(_libc.umount2(path.encode(), MNT_DETACH), "umount2")
            mounted = False
            os.rmdir(path)
            t3 = time.perf_counter_ns()
        finally:
            if mounted:
                _libc.umount2(path.encode(), MNT_DETACH)
            if os.path.isdir(path):
                os.rmdir(path)
        return {"mount": t2 - t1, "cycle": t3 - t0}

    def variants(self) -> list[Variant]:
        base = [
            Variant("baseline"),
            Variant("rlimits", child_step=self.step_rlimits),
            Variant("cgroup-join", parent_step=self.parent_join, after=self.after_reused),
            Variant("cgroup-new", parent_step=self.parent_new, after=self.after_new),
            Variant("caps-nnp", child_step=self.step_caps),
            Variant("landlock", child_prep=self.prep_landlock, child_step=self.step_landlock),
            Variant("seccomp", child_prep=self.prep_dropped, child_step=self.step_seccomp),
            Variant("all", child_prep=self.prep_all, child_step=self.step_all,
                    parent_step=self.parent_join_or_none, after=self.after_reused),
            Variant("all-deployed", child_prep=self.prep_dropped, child_step=self.step_all,
                    parent_step=self.parent_join_or_none, after=self.after_reused),
            Variant("seccomp-self", child_prep=self.prep_dropped, child_step=self.step_seccomp_self),
            Variant("worker-ns", child_prep=self.prep_kept, child_step=self.step_worker_ns),
            Variant("idmap", child_prep=self.prep_worker, child_step=self.step_idmap),
            Variant("userns", child_prep=self.prep_worker, child_step=self.step_userns),
            Variant("all-deployed-uid", child_prep=self.prep_worker, child_step=self.step_all_uid,
                    parent_step=self.parent_join_or_none, after=self.after_reused),
            Variant("all-deployed-uid-nolease", child_prep=self.prep_worker, child_step=self.step_all_uid_nolease,
                    parent_step=self.parent_join_or_none, after=self.after_reused),
            Variant("netns", child_step=self.step_netns),
            Variant("ipcns", child_step=self.step_ipcns),
            Variant("mntns", child_step=self.step_mntns),
            Variant("pidns", child_step=self.step_pidns),
            Variant("clone", child_step=self.step_clone),
            Variant("clone-newpid", child_step=self.step_clone_newpid),
            Variant("tmpfs", parent_step=self.parent_tmpfs, fork=False),
        ]
        twice = {r.warm: r.variant for r in ROWS if r.warm}
        return base + [dataclasses.replace(next(v for v in base if v.key == key), key=warm, twice=True, samples=[])
                       for warm, key in twice.items()]

    def cleanup(self) -> list[str]:
        """Remove every cgroup, mount and directory made here; what could not be removed."""
        left = []
        for cg in self.stuck:
            cg.kill_all()
        for cgs in (self.reused, self.fresh):
            cgs.close()
            left += [b for b in cgs.bases.values() if os.path.isdir(b)]
        for point in _mounts_under(self.base):
            _libc.umount2(point.encode(), MNT_DETACH)
        shutil.rmtree(self.base, ignore_errors=True)
        left += _mounts_under(self.base) + ([self.base] if os.path.exists(self.base) else [])
        return left


def _mounts_under(root: str) -> list[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4].replace("\\040", " ") for line in f]
    except OSError:
        return []
    return sorted((p for p in points if p.startswith(root + "/")), key=len, reverse=True)


def _child(v: Variant, go_r: int, go_w: int, res_r: int, res_w: int) -> NoReturn:
    code = 0
    try:
        os.close(go_w)
        os.close(res_r)
        if v.child_prep is not None:
            v.child_prep()
        if os.read(go_r, 1) != b"g":  # EOF: the parent gave up (or is gone)
            os._exit(3)
        ns = ns2 = 0
        flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        if v.child_step is not None:
            t0 = time.perf_counter_ns()
            own = v.child_step()
            ns = time.perf_counter_ns() - t0 if own is None else own
        flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt
        if v.twice and v.child_step is not None:
            t0 = time.perf_counter_ns()
            own = v.child_step()
            ns2 = time.perf_counter_ns() - t0 if own is None else own
        os.write(res_w, struct.pack("<qqq", ns, ns2, flt))
    except BaseException as e:  # noqa: BLE001 (report it to the parent, whatever it is)
        code = 1
        with contextlib.suppress(OSError):
            os.write(res_w, struct.pack("<q", -1) + f"{type(e).__name__}: {e}".encode()[:2000])
    os._exit(code)


def sample(v: Variant) -> dict[str, int]:
    """One sample of one layer: named times in nanoseconds ("total": fork -> reaped)."""
    if not v.fork:
        assert v.parent_step is not None
        return v.parent_step(0)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    deadline = time.monotonic() + TIMEOUT
    t0 = time.perf_counter_ns()
    try:
        pid = os.fork()
    except BaseException:
        for fd in (go_r, go_w, res_r, res_w):
            os.close(fd)
        raise
    if pid == 0:
        _child(v, go_r, go_w, res_r, res_w)
    parts: dict[str, int] = {}
    reaped = False
    try:
        os.close(go_r)
        os.close(res_w)
        if v.parent_step is not None:
            parts.update(v.parent_step(pid))
        os.write(go_w, b"g")
        data = _read_to_eof(res_r, deadline)
        status = _reap(pid, max(0.0, deadline - time.monotonic()))
        reaped = True
        t1 = time.perf_counter_ns()
    finally:
        for fd in (go_w, res_r):
            os.close(fd)
        if not reaped:
            try:
                os.kill(pid, signal.SIGKILL)
                _reap(pid, 5.0)
            except (OSError, TimeoutError):
                pass
        if v.after is not None:
            v.after()
    if len(data) < 24 or struct.unpack("<q", data[:8])[0] < 0 or status != 0:
        raise RuntimeError(data[8:].decode(errors="replace") or f"child exited with status {status:#x}")
    ns, ns2, flt = struct.unpack("<qqq", data[:24])
    if v.child_step is not None:
        parts["child"], parts["faults"] = ns, flt
        if v.twice:
            parts["child2"] = ns2
    parts["total"] = t1 - t0
    return parts


def _stats(per_rep: list[float]) -> dict[str, Any]:
    return {"per_rep": [round(x, 2) for x in per_rep], "min": round(min(per_rep), 2),
            "median": round(statistics.median(per_rep), 2), "max": round(max(per_rep), 2)}


def _per_rep(v: Variant, parts: tuple[str, ...], scale: float = 1000) -> list[float]:
    """Each repetition's median of the sum of `parts` (ns -> µs by default)."""
    return [statistics.median(sum(s.get(p, 0) for p in parts) / scale for s in rep) for rep in v.samples]


def _ok(v: Variant | None, reps: int) -> bool:
    return v is not None and v.error is None and len(v.samples) == reps and all(v.samples)


def summarize(variants: dict[str, Variant], reps: int) -> list[dict[str, Any]]:
    out = []
    for row in ROWS:
        v = variants.get(row.variant)
        if v is None:
            continue
        doc: dict[str, Any] = {"key": row.key, "label": row.label, "timed_in": row.timed_in, "setup_us": None,
                               "warm_us": None, "minor_faults": None, "total_us": None, "delta_vs": row.ref,
                               "delta_us": None}
        if not _ok(v, reps):
            doc["error"] = v.error or "no samples"
            out.append(doc)
            continue
        if row.parts:
            doc["setup_us"] = _stats(_per_rep(v, row.parts))
            if len(row.parts) > 1:
                doc["parts_us"] = {p: _stats(_per_rep(v, (p,))) for p in row.parts}
            if "child" in row.parts:
                doc["minor_faults"] = _stats(_per_rep(v, ("faults",), 1))
        w = variants.get(row.warm) if row.warm else None
        if w is not None and _ok(w, reps):
            doc["warm_us"] = _stats(_per_rep(w, tuple("child2" if p == "child" else p for p in row.parts)))
        if v.fork and (row.ref is not None or not row.parts):
            totals = _per_rep(v, ("total",))
            doc["total_us"] = _stats(totals)
            ref = variants.get(row.ref) if row.ref else None
            if ref is not None and _ok(ref, reps):
                doc["delta_us"] = _stats([a - b for a, b in zip(totals, _per_rep(ref, ("total",)))])
        doc["samples_per_rep"] = [len(rep) for rep in v.samples]
        out.append(doc)
    return out


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [(f"Sandbox layers, per-job set-up time: {env['samples_per_rep']} samples per layer per repetition, "
              f"{env['reps']} repetitions; min/median/max over repetitions of each repetition's median, in µs."),
             (f"Kernel {env['kernel']}, {env['cpus']} CPUs, Landlock ABI {env['landlock_abi']}, seccomp BPF "
              f"{env['seccomp_bpf_instructions']} + {env['seccomp_self_instructions']} instructions, cgroups "
              f"{env['cgroup_mode']}, agent module {env['agent_module']} ({env['read_dirs']} read dirs), "
              f"Python {env['python']}; job uid {env['job_uid']}, private view "
              + (f"opening {len(env['private_view'].get('opened', []))} dir(s)"
                 if env["private_view"].get("job_uids") else "unavailable") + "."),
             ("Set-up: the first application in a fresh fork (copy-on-write faults included, as a fresh worker "
              "pays them); warm: a second application in the same child; faults: minor page faults during the "
              "first; Δ: fork→reaped minus that of the variant named."
              + (" No cgroups here: the `all` rows leave the join out." if env["cgroup_mode"] == "none" else "")),
             "",
             ("| layer | timed in | set-up min | set-up median | set-up max | warm (median) | faults (median) "
              "| fork→reaped (median) | Δ fork→reaped (median) |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(stats: dict[str, Any] | None, key: str = "median", fmt: str = ".1f") -> str:
        return "–" if stats is None else format(stats[key], fmt)

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['timed_in']} | unavailable: {r['error']} | | | | | | |")
            continue
        s, d = r["setup_us"], r["delta_us"]
        delta = "–" if d is None else f"{d['median']:+.1f} (vs {r['delta_vs']})"
        lines.append(f"| {r['label']} | {r['timed_in']} | {cell(s, 'min')} | {cell(s)} | {cell(s, 'max')} | "
                     f"{cell(r['warm_us'])} | {cell(r['minor_faults'], fmt='.0f')} | {cell(r['total_us'])} | "
                     f"{delta} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, help="repetitions (default 5; 3 with --quick)")
    ap.add_argument("--n", type=int, help="samples per layer per repetition (default 300; 50 with --quick)")
    ap.add_argument("--quick", action="store_true", help="50 samples per repetition, 3 repetitions")
    ap.add_argument("--agent-module", default="examples.agents", help="whose read dirs Landlock gets")
    ap.add_argument("--only", help="comma-separated variants (baseline is always run): "
                    + ",".join(dict.fromkeys(r.variant for r in ROWS)))
    ap.add_argument("--uid", type=int, default=JOB_UID, help=f"the job uid of the uid variants (default {JOB_UID})")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "layers.json"))
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    n = args.n or (50 if args.quick else 300)
    if reps < 1 or n < 1:
        ap.error("--reps and --n must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the clean-up below runs

    base = os.path.join(SHM if os.path.isdir(SHM) else "/tmp", NAME)
    os.mkdir(base, 0o700)
    bench: Bench | None = None
    lease_root: str | None = None
    try:
        lease_root = tempfile.mkdtemp(prefix=f"{NAME}-lease-", dir="/tmp")  # 0700, root's
        bench = Bench(args.agent_module, base, lease_root, args.uid)
        variants = {v.key: v for v in bench.variants()}
        if args.only:
            keep = {"baseline"} | set(args.only.split(","))
            unknown = keep - set(variants)
            if unknown:
                ap.error(f"--only: unknown {','.join(sorted(unknown))}")
            keep |= {x for r in ROWS if r.variant in keep for x in (r.ref, r.warm) if x}  # what rows compare with
            variants = {k: v for k, v in variants.items() if k in keep}
        gc.collect()
        gc.freeze()  # as the fork server does before it serves
        rng = random.Random(args.seed)
        t_start = time.monotonic()
        for rep in range(reps):
            for v in variants.values():
                v.samples.append([])
            order = list(variants.values())
            for i in range(n + 5):  # the first 5 rounds warm up and are not kept
                rng.shuffle(order)
                for v in order:
                    if v.error is not None:
                        continue
                    try:
                        s = sample(v)
                    except Exception as e:  # noqa: BLE001 (this layer cannot run here: report it, go on)
                        v.error = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:300]
                        print(f"[layers] {v.key}: {v.error}", file=sys.stderr)
                        continue
                    if i >= 5:
                        v.samples[-1].append(s)
            print(f"[layers] rep {rep + 1}/{reps} done ({time.monotonic() - t_start:.1f} s)", file=sys.stderr)
        rows = summarize(variants, reps)
        env = {"kernel": platform.release(), "landlock_abi": sandbox.LANDLOCK_ABI,
               "seccomp_bpf_instructions": len(bench.bpf) // 8 if bench.bpf else None,
               "cgroup_mode": bench.reused.mode, "agent_module": args.agent_module,
               "read_dirs": len(bench.read_dirs), "python": platform.python_version(),
               "cpus": os.cpu_count(), "samples_per_rep": n, "reps": reps, "seed": args.seed,
               "tmpfs_options": TMPFS_OPTS.decode(), "spec": bench.spec,
               "recycled_cgroups_made": bench.reused._made,
               "seccomp_self_instructions": (len(seccomp_self.build(*bench.self_filter, os.getpid())) // 8
                                             if bench.self_filter else None),
               "seccomp_self_resolve_us": round(bench.resolve_ns / 1000, 1),
               "job_uid": bench.uid, "spec_uid": bench.spec_uid, "private_view": bench.uid_facts}
        print(markdown(rows, env))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"benchmark": "layers", "environment": env, "rows": rows}, indent=2))
        print(f"[layers] wrote {args.out}", file=sys.stderr)
    finally:
        left = bench.cleanup() if bench is not None else []
        if bench is None:
            shutil.rmtree(base, ignore_errors=True)
        if lease_root is not None:  # never mounted on here: its idmapped mounts were the children's
            with contextlib.suppress(OSError):
                os.rmdir(lease_root)
            if os.path.exists(lease_root):
                left.append(lease_root)
        if left:
            print(f"[layers] could not remove: {', '.join(left)}", file=sys.stderr)


if __name__ == "__main__":
    main()
