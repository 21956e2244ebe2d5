"""A directory tree standing in for cgroupfs, with the kernel's rules the supervisor meets.

`mkdir` fills a new group with its control files at the kernel's defaults; `write` applies
what the kernel checks: in v1 `memory.memsw.limit_in_bytes` may never be below
`memory.limit_in_bytes` (either write that would break it fails with EINVAL), memory
limits are kept in whole pages, `pids.max` takes a number or "max"; `rmdir` fails while
the group lists a task.
"""

from __future__ import annotations

import errno
import os

from supervisor.sandbox.cgroup_host import V1_CONTROLLERS, CgroupFS
from supervisor.sandbox.worker_cgroup import PAGE

UNLIMITED = str((1 << 63) - PAGE)  # what v1 reads for "no limit"


class FakeCgroupFS(CgroupFS):
    def __init__(self, root: str, v2: bool = False, swap: bool = True,
                 controllers: tuple[str, ...] = V1_CONTROLLERS) -> None:
        self.root = root
        self.v2 = v2
        self.swap = swap  # v1 swap accounting: the memsw files exist
        self.writes: list[tuple[str, str]] = []  # (path relative to the root, value), in order
        self.fail: dict[str, OSError] = {}  # file name -> the error its writes raise
        self.ignore: set[str] = set()  # file names whose writes are accepted and dropped
        if v2:
            self._put(os.path.join(root, "cgroup.controllers"), "cpu memory pids")
            self._put(os.path.join(root, "cgroup.subtree_control"), "memory pids")
        else:
            for ctl in controllers:
                os.makedirs(os.path.join(root, ctl), exist_ok=True)

    # -- the tree -------------------------------------------------------------
    @staticmethod
    def _put(path: str, text: str) -> None:
        with open(path, "w") as f:
            f.write(text)

    def _controller(self, path: str) -> str:
        return "unified" if self.v2 else os.path.relpath(path, self.root).split(os.sep)[0]

    def mkdir(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        files = {"cgroup.procs": ""}
        ctl = self._controller(path)
        if ctl == "memory":
            files["memory.limit_in_bytes"] = UNLIMITED
            files["memory.oom_control"] = "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"
            if self.swap:
                files["memory.memsw.limit_in_bytes"] = UNLIMITED
        elif ctl == "pids":
            files["pids.max"] = "max"
        elif ctl == "cpuacct":
            files["cpuacct.usage"] = "0"
        elif ctl == "unified":
            files.update({"memory.max": "max", "memory.swap.max": "max", "memory.oom.group": "0",
                          "memory.events": "oom 0\noom_kill 0\n", "pids.max": "max",
                          "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n", "cgroup.subtree_control": ""})
        for name, text in files.items():
            self._put(os.path.join(path, name), text)

    def rmdir(self, path: str) -> None:
        procs = os.path.join(path, "cgroup.procs")
        if os.path.exists(procs) and self.read(procs).split():
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        for name in os.listdir(path):
            if os.path.isdir(os.path.join(path, name)):
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)

    # -- the kernel's rules ---------------------------------------------------------
    def write(self, path: str, value: str) -> None:
        name = os.path.basename(path)
        if name in self.fail:
            raise self.fail[name]
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        self.writes.append((os.path.relpath(path, self.root), value))
        if name in self.ignore:
            return
        d = os.path.dirname(path)
        if name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes", "memory.max"):
            if name == "memory.max" and value.strip() == "max":
                self._put(path, "max")
                return
            n = self._bytes(value) // PAGE * PAGE
            if name == "memory.limit_in_bytes":
                memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
                if os.path.exists(memsw) and n > int(self.read(memsw)):
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
            elif name == "memory.memsw.limit_in_bytes":
                if n < int(self.read(os.path.join(d, "memory.limit_in_bytes"))):
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
            self._put(path, str(n))
        elif name == "pids.max":
            v = value.strip()
            if v != "max":
                self._bytes(v)
            self._put(path, v)
        else:
            self._put(path, value)

    @staticmethod
    def _bytes(value: str) -> int:
        try:
            n = int(value.strip())
        except ValueError:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL)) from None
        if n < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return n

    # -- for the tests ------------------------------------------------------------
    def value(self, path: str) -> str:
        return self.read(path).strip()
