"""Turn whatever the agent writes to fd 1 and fd 2 into `log` events.

File descriptors 1 and 2 are pipes read by one thread, so output from C code
and child processes is caught as well as print(). Lines become `info` (stdout)
and `warn` (stderr) log events of the job running at the time. `drain()`
blocks until everything written before the call has been sent, so a job's
output always precedes its result.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
import threading
from collections.abc import Callable

MAX_LINE = 16 * 1024  # longer lines are cut into pieces of this size


class StdioCapture:
    def __init__(self, emit: Callable[[str, str], None]) -> None:
        self._emit = emit  # (level, line)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.close(out_w)
        os.close(err_w)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (out_r, err_r, self._wake_r):
            os.set_blocking(fd, False)
        self._levels = {out_r: "info", err_r: "warn"}
        self._partial: dict[int, bytes] = {out_r: b"", err_r: b""}
        self._drained = threading.Event()
        self._busy = False  # the thread holds bytes it has read but not yet sent
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="arcp-stdio", daemon=True).start()

    def drain(self, timeout: float = 2.0) -> None:
        if not self._busy and not any(_pending(fd) for fd in self._levels):
            return  # nothing written, nothing in flight: no round trip to the thread
        with self._lock:
            self._drained.clear()
            os.write(self._wake_w, b"d")
            self._drained.wait(timeout)

    def _loop(self) -> None:
        fds = [*self._levels, self._wake_r]
        while True:
            ready, _, _ = select.select(fds, [], [])
            self._busy = True
            drain = False
            for fd in ready:
                if fd == self._wake_r:
                    os.read(self._wake_r, 64)
                    drain = True
                else:
                    self._read(fd, final=False)
            if drain:
                for fd in self._levels:
                    self._read(fd, final=True)
                self._drained.set()
            self._busy = False

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
            if len(data) < 65536:
                break
        *lines, rest = buf.split(b"\n")
        while len(rest) > MAX_LINE:
            lines.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        if final and rest:
            lines.append(rest)
            rest = b""
        self._partial[fd] = rest
        level = self._levels[fd]
        for line in lines:
            self._emit(level, line.decode("utf-8", "replace").rstrip("\r"))


def _pending(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])
