"""Linux capabilities by number, and which of them this process holds (/proc/self/status)."""

from __future__ import annotations

CAP_SETGID, CAP_SETUID, CAP_NET_ADMIN, CAP_SYS_ADMIN = 6, 7, 12, 21
NAMES = {CAP_SETGID: "CAP_SETGID", CAP_SETUID: "CAP_SETUID", CAP_NET_ADMIN: "CAP_NET_ADMIN",
         CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}
# What giving jobs uids of their own takes: switching to them, and the private mount view
# and namespaces in which they can read Python and their leased paths.
FOR_JOB_UIDS = (CAP_SETUID, CAP_SETGID, CAP_SYS_ADMIN)


def held(which: str = "CapEff") -> int:
    """The capability mask of this process's set `which` (CapEff, CapPrm, CapBnd, ...); 0 when
    /proc cannot tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(which + ":"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def mask(caps: tuple[int, ...] | list[int]) -> int:
    return sum(1 << c for c in set(caps))


def missing(caps: tuple[int, ...] | list[int], have: int | None = None) -> list[str]:
    """The names of the capabilities among `caps` that are not in `have` (by default this
    process's effective set)."""
    have = held() if have is None else have
    return [NAMES.get(c, f"capability {c}") for c in caps if not have >> c & 1]
