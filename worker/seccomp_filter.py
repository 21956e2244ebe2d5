"""The seccomp filter every job runs under: a deny-list that returns errors, not kills.

Built once with libseccomp (through pyseccomp) in the fork server, exported as
BPF, and loaded in each worker with one prctl() after Landlock. What libraries
probe gets an error they handle (clone3 -> ENOSYS, so libc falls back to clone);
what a job must never do gets EPERM: tracing, mounts and the new mount API,
namespace changes, io_uring, bpf, perf, keyrings, userfaultfd, kexec, kernel
modules, personality changes, process_madvise/pidfd_getfd/kcmp, inotify and fanotify,
new AF_UNIX sockets (socketpair() is fine), AF_VSOCK
sockets, terminal injection, and every IP socket but plain TCP: Landlock's port rules
cover TCP only, so a datagram, raw, SCTP or MPTCP socket, or a TCP Fast Open send
(which connects without connect()), could otherwise reach another job's port.
"""

from __future__ import annotations

import ctypes
import os
import errno
import tempfile

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
CLONE_NEW = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
             "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
             "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080}
AF_UNIX, AF_INET, AF_INET6, AF_VSOCK = 1, 2, 10, 40
SOCK_STREAM, SOCK_TYPE_MASK = 1, 0xF
NON_STREAM_TYPES = (2, 3, 4, 5, 6, 10)  # dgram, raw, rdm, seqpacket, dccp, packet
IPPROTO_TCP = 6
MSG_FASTOPEN = 0x20000000
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
DENIED = (
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "mount_setattr", "pivot_root", "chroot", "unshare", "setns",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open", "keyctl", "add_key",
    "request_key", "userfaultfd", "kexec_load", "kexec_file_load", "init_module", "finit_module",
    "delete_module", "acct", "swapon", "swapoff", "reboot", "syslog", "quotactl", "lookup_dcookie",
    "open_by_handle_at", "name_to_handle_at",
    # act on another process through a pidfd (no compare can tie one to the caller)
    "process_madvise", "pidfd_getfd", "kcmp",
    # inotify and fanotify report file names in any directory the caller may read, which
    # Landlock does not cover: other jobs' temp files, the host's world-readable trees
    "inotify_init", "inotify_init1", "fanotify_init",
)


def build_bpf(refuse_listen: bool = False) -> bytes | None:
    """The filter as BPF bytes; None when libseccomp is not available here. With
    `refuse_listen` (workers that share one network namespace), listen() is refused too: a
    listen() without bind() takes an ephemeral port, which Landlock's bind rule does not see,
    and ports of a shared namespace are every job's."""
    try:
        import pyseccomp as sc
    except (ImportError, OSError):
        return None
    try:
        f = sc.SyscallFilter(defaction=sc.ALLOW)
        for name in DENIED:
            try:
                f.add_rule(sc.ERRNO(errno.EPERM), name)
            except (ValueError, RuntimeError, OSError):
                continue  # not a syscall on this architecture
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        if refuse_listen:
            f.add_rule(sc.ERRNO(errno.EPERM), "listen")
        for flag in CLONE_NEW.values():
            f.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.EQ, AF_VSOCK))
        # A new AF_UNIX socket could connect to the host's pathname sockets, which neither
        # Landlock nor the network namespace covers; socketpair() (event loops, pipes) stays.
        f.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, AF_UNIX))
        for family in (AF_INET, AF_INET6):
            for t in NON_STREAM_TYPES:
                f.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, family),
                           sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, t))
            f.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, family),
                       sc.Arg(2, sc.GT, IPPROTO_TCP))
            for proto in range(1, IPPROTO_TCP):
                f.add_rule(sc.ERRNO(errno.EACCES), "socket", sc.Arg(0, sc.EQ, family), sc.Arg(2, sc.EQ, proto))
        for name, flags_arg in (("sendto", 3), ("sendmsg", 2), ("sendmmsg", 3)):
            f.add_rule(sc.ERRNO(errno.EACCES), name, sc.Arg(flags_arg, sc.MASKED_EQ, MSG_FASTOPEN, MSG_FASTOPEN))
        for req in (TIOCSTI, TIOCLINUX):
            f.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, req))
        f.add_rule(sc.ERRNO(errno.EPERM), "personality", sc.Arg(0, sc.NE, 0xFFFFFFFF))
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            return out.read()
    except (ValueError, RuntimeError, OSError):
        return None


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)


_SYS_SECCOMP = {"x86_64": 317, "aarch64": 277}
SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC = 1, 1


def load(bpf: bytes) -> None:
    """Install the filter on every thread of this process (no_new_privs must be set): seccomp()
    with TSYNC, which fails rather than leave a thread out (prctl would filter the calling
    thread only); prctl where the syscall's number is not known here."""
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    sysno = _SYS_SECCOMP.get(os.uname().machine)
    if sysno is None:
        if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
        return
    rc = _libc.syscall(sysno, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, ctypes.byref(prog))
    if rc != 0:
        if rc > 0:
            raise OSError(0, f"seccomp: thread {rc} could not take the filter")
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER, TSYNC) failed")
