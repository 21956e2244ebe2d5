"""The memory the supervisor may use, and `--memory-budget`'s default from it."""

from __future__ import annotations

import os
from pathlib import Path

from supervisor.config.settings import KiB

def memory_available(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The memory the supervisor may use: its cgroup's memory limit (the tightest of its
    group and the groups above it, v1 `memory.limit_in_bytes` or v2 `memory.max`) if one is
    set and below the host's, else the host's MemTotal."""
    total = _mem_total(f"{proc}/meminfo")
    limit = _cgroup_memory_limit(f"{proc}/self/cgroup", cgroup_root)
    return min(total, limit) if limit is not None else total


def default_memory_budget(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """`--memory-budget`'s default: 80% of `memory_available()`."""
    return memory_available(proc, cgroup_root) * 4 // 5


def _mem_total(path: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_memory_limit(self_cgroup: str, root: str) -> int | None:
    try:
        with open(self_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    if v1 is not None:
        return _tightest(f"{root}/memory", v1, "memory.limit_in_bytes")
    if v2 is not None and Path(root, "cgroup.controllers").exists():
        return _tightest(root, v2, "memory.max")
    return None


def _tightest(mount: str, group: str, name: str) -> int | None:
    """The lowest limit set on `group` or any group above it (a limit applies to the subtree);
    None if none is. A group outside this mount's view (another cgroup namespace) counts
    from the mount's root."""
    best: int | None = None
    rel = Path(group.strip("/"))
    if ".." in rel.parts:  # not below this mount's root
        rel = Path()
    while True:
        try:
            text = Path(mount, rel, name).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "unlimited" with a huge number, v2 with "max"
            best = int(text) if best is None else min(best, int(text))
        if rel == Path():
            return best
        rel = rel.parent
