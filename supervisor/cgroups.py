"""Per-worker cgroups (v1 memory and pids controllers; v2 where its controllers are delegated).

Each worker joins a cgroup of its own when it is forked (off any job's path);
the job's limits are written when the job arrives. The kernel then enforces
them: memory over the limit is OOM-killed inside the group only, forks past
`pids.max` fail with EAGAIN, and every task of the group — grandchildren that
called setsid() included — can be found and killed when the job ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal

log = logging.getLogger("arcp.cgroups")
V1_ROOT = "/sys/fs/cgroup"
V2_ROOT = "/sys/fs/cgroup"
PREFIX = "arcp-supervisor-"
MAX_FREE_GROUPS = 256


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class WorkerCgroup:
    """The cgroup directories of one worker (one per controller in v1)."""

    def __init__(self, dirs: dict[str, str], v2: bool) -> None:
        self.dirs = dirs  # controller -> directory
        self.v2 = v2
        self.limits_set: tuple[int, int] | None = None
        self.oom_base = 0  # OOM kills counted before the current worker joined (groups are reused)

    def procs_files(self) -> list[str]:
        """The files the worker writes "0" to, to move itself into its groups."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    @property
    def limits_memory(self) -> bool:
        return "memory" in self.dirs or "unified" in self.dirs

    def set_limits(self, memory: int, max_procs: int) -> None:
        if self.limits_set == (memory, max_procs):
            return  # a reused worker: the same limits (the supervisor's reuse key)
        if self.v2:
            d = self.dirs["unified"]
            _write(os.path.join(d, "memory.max"), str(memory))
            with contextlib.suppress(OSError):
                _write(os.path.join(d, "memory.swap.max"), "0")
            with contextlib.suppress(OSError):
                _write(os.path.join(d, "memory.oom.group"), "1")
            _write(os.path.join(d, "pids.max"), str(max_procs))
        else:
            if "memory" in self.dirs:
                d = self.dirs["memory"]
                _write(os.path.join(d, "memory.limit_in_bytes"), str(memory))
                with contextlib.suppress(OSError):  # no swap accounting: RAM only
                    _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(memory))
            if "pids" in self.dirs:
                _write(os.path.join(self.dirs["pids"], "pids.max"), str(max_procs))
        self.limits_set = (memory, max_procs)

    def oom_kills(self) -> int:
        """OOM kills the kernel made in this group so far."""
        try:
            if self.v2:
                text = _read(os.path.join(self.dirs["unified"], "memory.events"))
            elif "memory" in self.dirs:
                text = _read(os.path.join(self.dirs["memory"], "memory.oom_control"))
            else:
                return 0
        except OSError:
            return 0
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill" and v.strip().isdigit():
                return int(v)
        return 0

    def memory_exceeded(self) -> bool:
        """Did the kernel OOM-kill a task of this group since the current worker joined?"""
        return self.oom_kills() > self.oom_base

    def pids(self) -> list[int]:
        d = self.dirs.get("unified") or self.dirs.get("pids") or self.dirs.get("memory")
        if d is None:
            return []
        try:
            return [int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()]
        except (OSError, ValueError):
            return []

    def kill_all(self) -> None:
        """SIGKILL every task of the group, wherever it moved in the process tree."""
        if self.v2:
            with contextlib.suppress(OSError):
                _write(os.path.join(self.dirs["unified"], "cgroup.kill"), "1")
                return
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        """Remove the directories; False while tasks remain (try again later)."""
        ok = True
        for d in self.dirs.values():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                ok = False
        return ok


class Cgroups:
    """The supervisor's own subtree, one child group per worker."""

    def __init__(self) -> None:
        self.mode = "none"
        self.bases: dict[str, str] = {}
        self._free: list[WorkerCgroup] = []  # empty groups, ready for the next worker
        self._made = 0
        _remove_stale()
        name = f"{PREFIX}{os.getpid()}"
        if os.path.exists(os.path.join(V2_ROOT, "cgroup.controllers")):
            self._init_v2(name)
        else:
            self._init_v1(name)

    def _init_v1(self, name: str) -> None:
        for ctl in ("memory", "pids"):
            root = os.path.join(V1_ROOT, ctl)
            if not (os.path.isdir(root) and os.access(root, os.W_OK)):
                continue
            base = os.path.join(root, name)
            try:
                os.makedirs(base, exist_ok=True)
            except OSError as e:
                log.warning("cannot create the %s cgroup %s: %s", ctl, base, e)
                continue
            self.bases[ctl] = base
        if self.bases:
            self.mode = "v1"

    def _init_v2(self, name: str) -> None:
        try:
            enabled = _read(os.path.join(V2_ROOT, "cgroup.subtree_control")).split()
        except OSError:
            return
        if not {"memory", "pids"} <= set(enabled) or not os.access(V2_ROOT, os.W_OK):
            return
        base = os.path.join(V2_ROOT, name)
        try:
            os.makedirs(base, exist_ok=True)
            _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
        except OSError as e:
            log.warning("cannot create the cgroup %s: %s", base, e)
            return
        self.bases["unified"] = base
        self.mode = "v2"

    @property
    def layers(self) -> list[str]:
        if self.mode == "none":
            return []
        return [f"cgroup-{self.mode}-" + ctl for ctl in sorted(self.bases)]

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
                    os.makedirs(d, exist_ok=True)
                    dirs[ctl] = d
            except OSError as e:
                log.warning("cannot make a cgroup for a worker: %s", e)
                WorkerCgroup(dirs, self.mode == "v2").remove()
                return None
            cg = WorkerCgroup(dirs, self.mode == "v2")
        return cg

    def unreserve(self, cg: WorkerCgroup) -> None:
        """A reserved group whose worker was never forked: keep it for the next one."""
        if len(self._free) < MAX_FREE_GROUPS:
            self._free.append(cg)
        else:
            cg.remove()

    def recycle(self, cg: WorkerCgroup) -> bool:
        """A worker is gone: kill what it left; keep the group for the next worker if it is
        empty (False: tasks remain, try again later)."""
        cg.kill_all()
        if cg.pids():
            return False
        cg.oom_base = cg.oom_kills()
        if len(self._free) < MAX_FREE_GROUPS:
            self._free.append(cg)
        elif not cg.remove():
            return False
        return True

    def close(self) -> None:
        """At shutdown: kill what is left and remove the groups, waiting at most half a second
        for dying tasks to leave them (a later start removes what a crash left behind)."""
        import time

        for _ in range(10):
            for base in self.bases.values():
                _remove_tree(base)
            if not any(os.path.isdir(b) for b in self.bases.values()):
                return
            time.sleep(0.05)


def _remove_tree(base: str) -> None:
    """Kill what is left in a supervisor's groups and remove them (bounded: one pass)."""
    for entry in os.listdir(base) if os.path.isdir(base) else []:
        d = os.path.join(base, entry)
        if not os.path.isdir(d):
            continue
        try:
            pids = [int(x) for x in _read(os.path.join(d, "cgroup.procs")).split()]
        except (OSError, ValueError):
            pids = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.rmdir(d)
    with contextlib.suppress(OSError):
        os.rmdir(base)


def _remove_stale() -> None:
    """Groups left by supervisors that died (kill -9) are cleaned up at the next start."""
    for root in (os.path.join(V1_ROOT, "memory"), os.path.join(V1_ROOT, "pids"), V2_ROOT):
        try:
            entries = os.listdir(root)
        except OSError:
            continue
        for entry in entries:
            if entry.startswith(PREFIX) and entry[len(PREFIX):].isdigit():
                pid = int(entry[len(PREFIX):])
                if not os.path.exists(f"/proc/{pid}"):
                    _remove_tree(os.path.join(root, entry))
