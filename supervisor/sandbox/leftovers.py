"""What a supervisor leaves on the host, and which of it no supervisor holds any more.

Everything a supervisor makes for its workers outside its own memory (the cgroups of
sandbox/cgroups.py; the temp dirs and tmpfs mounts of sandbox/job_dirs.py) lives under a
directory named `arcp-supervisor-<pid>`. The supervisor removes its own when it closes; what a
supervisor that was killed left there, the next one to start removes. Each resource removes a
tree through one function, the same at close and for what was left behind
(`cgroups.remove_tree`, `job_dirs.remove_root`); which trees were left behind is decided here.
"""

from __future__ import annotations

import os

PREFIX = "arcp-supervisor-"


def own_name() -> str:
    """This process's directory name."""
    return f"{PREFIX}{os.getpid()}"


def owner(name: str) -> int | None:
    """The pid a supervisor's directory is named after, or None if `name` is not one."""
    if not name.startswith(PREFIX):
        return None
    rest = name[len(PREFIX):]
    return int(rest) if rest.isdigit() else None


def left_behind(parent: str) -> list[str]:
    """The supervisors' directories in `parent` that no running supervisor holds: their pid runs
    no process, or it is this process's own (another process had this pid before; this one asks
    before it makes its own directory, so nothing there is its)."""
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    out = []
    for name in names:
        pid = owner(name)
        if pid is not None and (pid == os.getpid() or not os.path.exists(f"/proc/{pid}")):
            out.append(os.path.join(parent, name))
    return out
