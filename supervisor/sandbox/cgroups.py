"""The supervisor's cgroups: its own subtree, one child group per worker, recycled.

`Cgroups` makes a base group where `detect` (cgroup_host.py) finds a place for one, hands
each new worker a group of its own (worker_cgroup.py), keeps the groups of workers that
are gone for the next ones (making a memory cgroup costs the kernel far more than reusing
one), and removes them all at close. Groups that a supervisor killed with -9 left behind
are removed at the next start (`remove_left_behind`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

from supervisor.sandbox.cgroup_host import HOST_FS, ROOT, V1_CONTROLLERS, CgroupFS, CgroupHost, detect
from supervisor.sandbox.leftovers import left_behind, own_name
from supervisor.sandbox.worker_cgroup import WorkerCgroup

log = logging.getLogger("arcp.cgroups")
MAX_FREE_GROUPS = 256


class Cgroups:
    """The supervisor's own subtree, one child group per worker."""

    root = ROOT  # class defaults: a subclass may skip __init__ and call _init_v1/_init_v2 itself
    fs = HOST_FS

    def __init__(self, root: str | None = None, fs: CgroupFS | None = None) -> None:
        """`root` is where the controllers are mounted (a fake tree in tests, with `fs`
        emulating the kernel's rules)."""
        if root is not None:
            self.root = root
        if fs is not None:
            self.fs = fs
        self._free: list[WorkerCgroup] = []  # empty groups, ready for the next worker
        self._made = 0
        remove_left_behind(self.root, self.fs)
        self._make(own_name())

    def _make(self, name: str) -> None:
        """A base group `name` in each place `detect` finds (one that cannot be made is skipped)."""
        found = detect(self.root, self.fs)
        self.bases: dict[str, str] = {}
        failed = []
        for ctl in found.controllers:
            base = os.path.join(self.root, name) if ctl == "unified" else os.path.join(self.root, ctl, name)
            try:
                self.fs.mkdir(base)
                if ctl == "unified":
                    self.fs.write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
            except OSError as e:
                log.warning("cannot create the cgroup %s: %s", base, e)
                failed.append(f"cannot create {base}: {e.strerror or e}")
                with contextlib.suppress(OSError):
                    self.fs.rmdir(base)
                continue
            self.bases[ctl] = base
        self.mode = found.version if self.bases else "none"
        # What job.accepted names: the groups made, not only those that could have been.
        self.in_use = CgroupHost(found.version, tuple(sorted(self.bases)),
                                 "; ".join(w for w in [found.why, *failed] if w))

    # What the layer bench (scripts/bench_lib/layers.py) calls to make groups under a name of its own.
    def _init_v1(self, name: str) -> None:
        self._make(name)

    _init_v2 = _init_v1

    @property
    def layers(self) -> list[str]:
        return self.in_use.layers

    def reserve(self) -> WorkerCgroup | None:
        """A group of its own for the next worker (a reused empty one, or a new one), which
        the worker joins itself right after fork; None when cgroups are unavailable. Making
        a memory cgroup costs the kernel far more than reusing one, so groups are recycled
        rather than removed."""
        if not self.bases:
            return None
        cg = self._free.pop() if self._free else None
        if cg is None:
            self._made += 1
            dirs = {}
            try:
                for ctl, base in self.bases.items():
                    d = os.path.join(base, f"g{self._made}")
                    self.fs.mkdir(d)
                    dirs[ctl] = d
            except OSError as e:
                log.warning("cannot make a cgroup for a worker: %s", e)
                WorkerCgroup(dirs, self.mode == "v2", self.fs).remove()
                return None
            cg = WorkerCgroup(dirs, self.mode == "v2", self.fs)
        return cg

    def unreserve(self, cg: WorkerCgroup) -> None:
        """A reserved group whose worker was never forked: keep it for the next one."""
        if len(self._free) < MAX_FREE_GROUPS and not cg.retired:
            self._free.append(cg)
        else:
            cg.remove()

    def recycle(self, cg: WorkerCgroup) -> bool:
        """A worker is gone: kill what it left; keep the group for the next worker if it is
        empty, or remove it if it was retired (False: tasks remain, try again later)."""
        cg.kill_all()
        if cg.pids():
            return False
        if cg.retired:
            return cg.remove()
        cg.oom_base = cg.oom_kills()
        cg.verified = None  # the next worker's first job writes and reads its limits again
        if len(self._free) < MAX_FREE_GROUPS:
            self._free.append(cg)
        elif not cg.remove():
            return False
        return True

    def close(self) -> None:
        """At shutdown: kill what is left and remove the groups, waiting at most half a second
        for dying tasks to leave them (a later start removes what a crash left behind)."""
        for _ in range(10):
            for ctl, base in self.bases.items():
                remove_tree(base, ctl, self.fs)
            if not any(os.path.isdir(b) for b in self.bases.values()):
                return
            time.sleep(0.05)


def remove_tree(base: str, ctl: str, fs: CgroupFS = HOST_FS) -> None:
    """Kill what is left in a supervisor's groups under `base` (of controller `ctl`, "unified"
    in v2) and remove them, in one pass: a group whose tasks are still dying stays for the next.
    The same for this supervisor's groups at close and for those a killed one left."""
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        entries = []
    for entry in entries:
        d = os.path.join(base, entry)
        if os.path.isdir(d):
            group = WorkerCgroup({ctl: d}, ctl == "unified", fs)
            group.kill_all()
            group.remove()
    with contextlib.suppress(OSError):
        fs.rmdir(base)


def remove_left_behind(root: str = ROOT, fs: CgroupFS = HOST_FS) -> None:
    """Groups of supervisors that died (kill -9), in the v2 root or any v1 controller."""
    for ctl, top in [("unified", root)] + [(c, os.path.join(root, c)) for c in V1_CONTROLLERS]:
        for tree in left_behind(top):
            if os.path.isdir(tree):
                remove_tree(tree, ctl, fs)
