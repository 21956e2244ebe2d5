"""Which directories keep an unprivileged uid from reaching the paths a job needs.

The fork server opens these up in its private mount view (worker/mount_ns.py);
`doctor` reports them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable


def searchable_by_others(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & stat.S_IXOTH)
    except OSError:
        return True  # absent: nothing to open up


def blocked_dirs(paths: Iterable[str]) -> dict[str, set[str]]:
    """Directories others may not search, each with the entries that must show through it
    (every entry, for a needed directory that is itself closed)."""
    blocked: dict[str, set[str]] = {}
    for path in paths:
        path = os.path.realpath(path)
        if not os.path.exists(path):
            continue
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts)):
            d = "/" + "/".join(parts[:i])
            if not searchable_by_others(d):
                blocked.setdefault(d, set()).add(parts[i])
        if os.path.isdir(path) and not searchable_by_others(path):
            blocked.setdefault(path, set()).update(os.listdir(path))
    return blocked


def unreadable_files(paths: Iterable[str]) -> list[str]:
    """Files among `paths` that others may not read (a mount view cannot fix those)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and not st.st_mode & stat.S_IROTH:
            out.append(path)
    return out
