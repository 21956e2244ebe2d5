"""Moving a proxied connection's bytes off the event loop: splice(2) in a thread of its own.

Once the proxy has checked a request, what is left is copying a byte stream from
one socket to another, possibly gigabytes. On the supervisor's event loop that
costs two user-space copies per chunk and starves every session while it runs.
Here a thread per direction splices socket -> pipe -> socket in the kernel (no
copy through Python), with the GIL released in each call; the loop only hears
about byte counts, a few times per second. A relay ends at end of stream, on
an error, or when its sockets are shut down by the proxy (the job ended).

The thread is not a task, but it has an owner all the same: the exchange that
started it waits for `finished`, and when that exchange is cancelled it shuts
the sockets down (which ends the splices) and waits for `finished` again, for a
bounded time, before it closes a descriptor the thread might still be using.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import socket
import threading
from collections.abc import Callable

import anyio

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
REPORT_EVERY = 4 << 20  # bytes between count reports to the loop


class Relay:
    """src -> dst until end of stream, in a thread; `finished` is set when the thread is done
    with the sockets (`total` is then the byte count). Made on the event loop, by the task
    that will wait for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: socket.socket, dst: socket.socket,
                 count: Callable[[int], None], half_close: bool = True) -> None:
        self.loop = loop
        self.src, self.dst = src, dst
        self.count = count
        self.half_close = half_close  # pass the end of stream on (a tunnel's other direction goes on)
        self.finished = anyio.Event()
        self.total = 0
        self.error: OSError | None = None
        self._lock = threading.Lock()
        self._unreported = 0  # bytes moved and not yet passed to `count`
        self._thread = threading.Thread(target=self._run, name="arcp-egress-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def flush(self) -> None:
        """On the loop: pass what moved so far to `count` (the job is ending: counts now)."""
        with self._lock:
            n, self._unreported = self._unreported, 0
        if n:
            self.count(n)

    def _moved(self, n: int) -> None:
        with self._lock:
            self._unreported += n
            due = self._unreported >= REPORT_EVERY
        if due:
            self.loop.call_soon_threadsafe(self.flush)

    def _run(self) -> None:
        total = 0
        error: OSError | None = None
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            self._finish(0, e)
            return
        try:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
            src, dst = self.src.fileno(), self.dst.fileno()
            readable, writable = select.poll(), select.poll()  # the sockets stay non-blocking
            readable.register(src, select.POLLIN)
            writable.register(dst, select.POLLOUT)
            flags = os.SPLICE_F_MOVE | os.SPLICE_F_MORE | os.SPLICE_F_NONBLOCK
            while True:
                try:
                    n = os.splice(src, w, PIPE_SIZE, flags=flags)
                except BlockingIOError:
                    readable.poll()  # a shutdown by the proxy wakes it too
                    continue
                if n == 0:
                    break
                left = n
                while left:
                    try:
                        left -= os.splice(r, dst, left, flags=flags)
                    except BlockingIOError:
                        writable.poll()
                total += n
                self._moved(n)
            if self.half_close:
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
        except OSError as e:  # a reset, or the proxy shut the sockets down
            error = e
        finally:  # whatever happened, the waiting exchange hears of it (once the pipe is gone)
            os.close(r)
            os.close(w)
            self._finish(total, error)

    def _finish(self, total: int, error: OSError | None) -> None:
        self.error = error

        def settle() -> None:
            self.total = total
            self.flush()
            self.finished.set()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(settle)
