"""Whether this host can give jobs a seccomp filter (libseccomp reachable through pyseccomp)."""

from __future__ import annotations


def seccomp_available() -> bool:
    try:
        import pyseccomp

        pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    except (ImportError, OSError, RuntimeError, ValueError):
        return False
    return True
