"""Turn whatever the agent writes to fd 1 and fd 2 into `log` events.

File descriptors 1 and 2 are pipes, so output from C code and child processes
is caught as well as print(). The worker's pipe thread reads them (they are
registered with the Channel), and lines become `info` (stdout) and `warn`
(stderr) log events of the job running at the time. `drain()`, called by the
job's thread before it reports the outcome, reads whatever is still waiting,
so a job's output always precedes its result.
"""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import threading
from collections.abc import Callable

MAX_LINE = 16 * 1024  # longer lines are cut into pieces of this size
F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20  # room for output between two reads of the pipe thread


class StdioCapture:
    def __init__(self, emit: Callable[[str, str], None]) -> None:
        self._emit = emit  # (level, line)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_w, err_w):
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass  # keep the default size
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        self.levels = {out_r: "info", err_r: "warn"}
        self._partial: dict[int, bytes] = {out_r: b"", err_r: b""}
        self._lock = threading.Lock()  # the pipe thread and drain() both read

    def on_readable(self, fd: int) -> None:
        with self._lock:
            self._read(fd, final=False)

    def drain(self) -> None:
        if not any(_pending(fd) for fd in self.levels) and not any(self._partial.values()):
            return  # nothing written since the last read: the common case costs two ioctls
        with self._lock:
            for fd in self.levels:
                self._read(fd, final=True)

    def _read(self, fd: int, final: bool) -> None:
        buf = self._partial[fd]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            buf += data
        *lines, rest = buf.split(b"\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        if final and rest:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        level = self.levels[fd]
        for line in lines:
            for off in range(0, max(len(line), 1), MAX_LINE):
                self._emit(level, line[off : off + MAX_LINE].decode("utf-8", "replace").rstrip("\r"))


def _pending(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])
