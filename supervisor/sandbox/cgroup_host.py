"""What a host's cgroupfs offers the supervisor, and how the supervisor touches it.

`detect` finds where this process could make worker groups (nothing is made): a v2 unified
hierarchy whose root delegates memory and pids, or the v1 controllers of V1_CONTROLLERS that
are mounted and may be written. `Cgroups` (cgroups.py) makes its groups where it says;
`doctor` reports it (sandbox/layers.py). `CgroupFS` is the file access every part of the
cgroup code goes through (tests give a fake tree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ROOT = "/sys/fs/cgroup"
V1_ROOT = ROOT
V2_ROOT = ROOT
V1_CONTROLLERS = ("memory", "pids", "cpuacct")


class CgroupFS:
    """How the supervisor touches cgroupfs: plain file operations (tests give a fake tree)."""

    # Raw descriptors rather than open(): the job runner reads a job's group several times a
    # second, and Python's buffered text files cost three times as much per small file.
    def read(self, path: str) -> str:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks: list[bytes] = []
            while True:
                b = os.read(fd, 65536)
                if not b:
                    return b"".join(chunks).decode()
                chunks.append(b)
        finally:
            os.close(fd)

    def write(self, path: str, value: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def mkdir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)


HOST_FS = CgroupFS()


@dataclass(frozen=True)
class CgroupHost:
    """What a host's cgroupfs offers the supervisor."""

    version: str  # "v2" (a unified hierarchy at the root), "v1" (a controller of ours mounted), "none"
    controllers: tuple[str, ...]  # where the supervisor makes groups: v1 controllers, or ("unified",)
    why: str = ""  # why there are none, or fewer than V1_CONTROLLERS

    @property
    def layers(self) -> list[str]:
        """The sandbox layers these groups are, as job.accepted names them."""
        return [layer_name(self.version, ctl) for ctl in sorted(self.controllers)]

    @property
    def bounds_memory_and_tasks(self) -> bool:
        """Do a worker's groups limit its memory and its tasks (not only count its CPU time)?"""
        return "unified" in self.controllers or {"memory", "pids"} <= set(self.controllers)


def layer_name(version: str, ctl: str) -> str:
    return f"cgroup-{version}-{ctl}"


def detect(root: str = ROOT, fs: CgroupFS = HOST_FS) -> CgroupHost:
    """Where this process could make worker groups under `root` (nothing is made): v2 where
    the root delegates memory and pids and may be written, v1 in each of V1_CONTROLLERS that
    is mounted and may be written. `Cgroups` makes its groups where this says; `doctor`
    reports it."""
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        try:
            enabled = fs.read(os.path.join(root, "cgroup.subtree_control")).split()
        except OSError as e:
            return CgroupHost("v2", (), f"cannot read cgroup.subtree_control: {e.strerror or e}")
        if not {"memory", "pids"} <= set(enabled):
            return CgroupHost("v2", (), f"memory and pids are not delegated (cgroup.subtree_control: "
                                        f"{' '.join(enabled) or 'empty'})")
        if not os.access(root, os.W_OK):
            return CgroupHost("v2", (), f"{root} may not be written")
        return CgroupHost("v2", ("unified",))
    mounted = [c for c in V1_CONTROLLERS if os.path.isdir(os.path.join(root, c))]
    usable = tuple(c for c in mounted if os.access(os.path.join(root, c), os.W_OK))
    missing = [c for c in V1_CONTROLLERS if c not in usable]
    why = ""
    if missing:
        why = ", ".join(f"{c} {'may not be written' if c in mounted else 'not mounted'}" for c in missing)
    return CgroupHost("v1" if mounted else "none", usable, why)
