"""A second seccomp filter: resource-limit and scheduling calls act on the caller only.

Landlock does not cover `prlimit64`, `sched_set*`, `setpriority`, `ioprio_set`,
`migrate_pages` or `move_pages`; each of them takes a process id, and under a
shared uid (or with the fork server's uid) it could lower the supervisor's
limits, park another job's worker at SCHED_IDLE or move its pages. This filter
lets such a call through only when its target is 0 (the caller) or the pid the
filter was built for (the worker itself), and answers EPERM otherwise.
`process_madvise` and `pidfd_getfd` act through a pidfd, which no compare can
tie to the caller, and are refused outright by the main filter.

The program is a few dozen classic-BPF instructions written here rather than by
libseccomp: the rule "the low 32 bits of an argument are one of two values" is
one that libseccomp's rule language cannot state for one argument, and a pid is
compared as the kernel reads it (`pid_t`: the low 32 bits; a value with high
bits set is refused, never let through). It is stacked on top of the main
filter; the kernel applies the stricter answer of the two.
"""

from __future__ import annotations

import errno
import struct

# Offsets in struct seccomp_data (little-endian hosts: the low half of an argument first).
_NR, _ARCH, _ARGS = 0, 4, 16
# Classic BPF opcodes.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JSET_K = 0x45
_RET_K = 0x06
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
X32_SYSCALL_BIT = 0x40000000

# name -> (index of the pid argument, index of a "which" argument or None, the "which"
# values that name one process or one process group); "who" 0 is the caller.
SELF_ONLY: dict[str, tuple[int, int | None, tuple[int, ...]]] = {
    "prlimit64": (0, None, ()),
    "sched_setparam": (0, None, ()),
    "sched_setscheduler": (0, None, ()),
    "sched_setattr": (0, None, ()),
    "sched_setaffinity": (0, None, ()),
    "migrate_pages": (0, None, ()),
    "move_pages": (0, None, ()),
    "setpriority": (1, 0, (0, 1)),  # PRIO_PROCESS, PRIO_PGRP (PRIO_USER could reach every process of a uid)
    "ioprio_set": (1, 0, (1, 2)),  # IOPRIO_WHO_PROCESS, IOPRIO_WHO_PGRP (not IOPRIO_WHO_USER)
}


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def resolve(arch_and_numbers: tuple[int, dict[str, int]] | None = None) -> tuple[int, dict[str, int]] | None:
    """The audit arch token and the syscall numbers of SELF_ONLY here (None: libseccomp absent)."""
    if arch_and_numbers is not None:
        return arch_and_numbers
    try:
        import pyseccomp as sc

        arch = int(sc.system_arch())
        numbers = {}
        for name in SELF_ONLY:
            nr = int(sc.resolve_syscall(arch, name))
            if nr >= 0:
                numbers[name] = nr
        return arch, numbers
    except (ImportError, OSError, RuntimeError, ValueError):
        return None


def build(arch: int, numbers: dict[str, int], self_pid: int) -> bytes:
    """The filter for a process whose pid is `self_pid`."""
    deny = _ins(_RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)
    allow = _ins(_RET_K, 0, 0, SECCOMP_RET_ALLOW)
    checks: list[bytes] = []  # one block per syscall: its number test, then its argument tests
    for name, nr in numbers.items():
        pid_arg, which_arg, which_ok = SELF_ONLY[name]
        block: list[bytes] = []
        if which_arg is not None:
            # which: low half in which_ok and high half zero, else deny
            block.append(_ins(_LD_W_ABS, 0, 0, _ARGS + 8 * which_arg + 4))
            block.append(_ins(_JEQ_K, 1, 0, 0))
            block.append(deny)
            block.append(_ins(_LD_W_ABS, 0, 0, _ARGS + 8 * which_arg))
            for i, w in enumerate(which_ok):
                left = len(which_ok) - i - 1
                block.append(_ins(_JEQ_K, left + 1, 0, w))  # to the pid test
            block.append(deny)
        # pid: high half zero and low half 0 or self_pid
        block.append(_ins(_LD_W_ABS, 0, 0, _ARGS + 8 * pid_arg + 4))
        block.append(_ins(_JEQ_K, 1, 0, 0))
        block.append(deny)
        block.append(_ins(_LD_W_ABS, 0, 0, _ARGS + 8 * pid_arg))
        block.append(_ins(_JEQ_K, 2, 0, 0))
        block.append(_ins(_JEQ_K, 1, 0, self_pid))
        block.append(deny)
        block.append(allow)
        # before the block: reload nr, jump into it on a match, else skip it
        head = [_ins(_LD_W_ABS, 0, 0, _NR), _ins(_JEQ_K, 0, len(block), nr)]
        checks.extend(head + block)
    prog = [_ins(_LD_W_ABS, 0, 0, _ARCH), _ins(_JEQ_K, 1, 0, arch), allow,  # another ABI: the main filter's
            # x32 numbers (the same arch token on x86_64) would name the same calls: refused
            _ins(_LD_W_ABS, 0, 0, _NR), _ins(_JSET_K, 0, 1, X32_SYSCALL_BIT), deny]
    prog += checks
    prog.append(allow)
    return b"".join(prog)
