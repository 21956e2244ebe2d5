"""Where workers share one network namespace (no per-worker one: a supervisor that is not
root), seccomp refuses listen(): a listen() without bind() autobinds a port of that shared
namespace, which Landlock's bind rule does not see."""

from __future__ import annotations

import ctypes
import errno
import os
import socket

import pytest

from worker import seccomp_filter


def _listen_errno_under(refuse_listen: bool) -> int:
    """Load the filter in a forked child, try listen() without bind(): 0 or the errno."""
    bpf = seccomp_filter.build_bpf(refuse_listen=refuse_listen)
    if bpf is None:
        pytest.skip("libseccomp is not available on this host")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 255
        try:
            ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
            seccomp_filter.load(bpf)
            s = socket.socket()
            try:
                s.listen(1)
                code = 0
            except OSError as e:
                code = e.errno or 254
        finally:
            os.write(w, bytes([code]))
            os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
    return got[0]


def test_listen_is_refused_where_the_namespace_is_shared() -> None:
    assert _listen_errno_under(refuse_listen=True) == errno.EPERM


def test_listen_works_in_a_namespace_of_the_workers_own() -> None:
    assert _listen_errno_under(refuse_listen=False) == 0
