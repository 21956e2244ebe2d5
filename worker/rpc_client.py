"""The worker's end of the pipe: framed sends, blocking calls, and a reader thread.

Every frame the agent's calls produce is queued under one lock, so frames from
several agent threads never interleave. A call blocks its caller until the
supervisor's reply arrives; the reader thread delivers replies, new jobs and
cancel requests. If the pipe breaks, the supervisor is gone and so is the job:
the process exits at once.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from shared import pipe_messages as pm
from shared.errors import ARCPError, Cancelled, InternalError, from_wire
from shared.exit_codes import PIPE_ERROR
from shared.pipe_codec import CodecError, FrameDecoder, encode


class _Pending:
    __slots__ = ("event", "ok", "value", "callback")

    def __init__(self, callback: Callable[[bool, Any], None] | None = None) -> None:
        self.event = threading.Event()
        self.ok = False
        self.value: Any = None
        self.callback = callback


FLUSH_DELAY = 0.0005  # seconds a fire-and-forget frame may wait to be batched with others
BATCH_BYTES = 64 * 1024  # ... or until this many bytes are waiting


class Channel:
    """Framed msgpack over the worker's socket to the supervisor.

    Fire-and-forget frames (events) are batched: they go out when 64 KiB are
    waiting, when a call or the job's outcome is sent, or half a millisecond
    after the first of them, whichever comes first; one write then carries
    many frames. The pipe thread also reads any extra descriptors registered
    in `extra` (the agent's stdout and stderr), so a worker has one helper
    thread, not two.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()
        self._plock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_call = 0
        self._buf: list[bytes] = []
        self._buf_size = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.extra: dict[int, Callable[[int], None]] = {}
        self.jobs: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
        self.on_cancel: Callable[[str], None] = lambda reason: None
        # Jobs received, and the number of the last one a CANCEL came for. The supervisor sends a
        # job's CANCEL only after its JOB, so a CANCEL is for the last job received: also when
        # that job has not started yet (both frames read at once, or the CANCEL read before the
        # runner took the job). Read and written under `cancel_lock` (see Runner.run).
        self.cancel_lock = threading.Lock()
        self.jobs_received = 0
        self.cancelled_job = 0
        self._decoder = FrameDecoder(pm.MAX_PIPE_FRAME)
        self._go = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="arcp-pipe", daemon=True)

    @property
    def started(self) -> bool:
        return self._reader.ident is not None

    def start(self) -> None:
        """Start the reader thread (once); it waits until `first_job()` hands the pipe over.
        Started only once the first job's sandbox is applied: a thread inherits its creator's
        Landlock domain and seccomp filters, but one that exists before them keeps none of
        them (Landlock restricts the calling thread only), and the agent could get it to run
        its code (worker/runner.py)."""
        if not self.started:
            self._reader.start()

    def first_job(self) -> dict[str, Any]:
        """Read the first job on this thread (no thread hand-off on a job's critical path)."""
        try:
            while self.jobs.empty():
                data = self.sock.recv(1 << 16)
                if not data:
                    os._exit(PIPE_ERROR)
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
        except (OSError, CodecError, ValueError):
            os._exit(PIPE_ERROR)
        self._go.set()
        return self.jobs.get_nowait()

    # -- sending ------------------------------------------------------------
    def send(self, obj: Any) -> None:
        """Queue a fire-and-forget frame (it leaves within FLUSH_DELAY)."""
        data = encode(obj, pm.MAX_PIPE_FRAME)
        with self._wlock:
            self._buf.append(data)
            self._buf_size += len(data)
            if self._buf_size >= BATCH_BYTES:
                self._flush_locked()
            elif len(self._buf) == 1:
                try:
                    os.write(self._wake_w, b"f")  # the pipe thread arms the flush timer
                except BlockingIOError:
                    pass

    def send_now(self, obj: Any) -> None:
        """Send a frame, and everything queued before it, at once."""
        data = encode(obj, pm.MAX_PIPE_FRAME)
        with self._wlock:
            self._buf.append(data)
            self._flush_locked()

    def flush(self) -> None:
        with self._wlock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._buf:
            return
        data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        self._buf.clear()
        self._buf_size = 0
        try:
            self.sock.sendall(data)
        except OSError:
            os._exit(PIPE_ERROR)

    def _register(self, callback: Callable[[bool, Any], None] | None) -> tuple[int, _Pending]:
        p = _Pending(callback)
        with self._plock:
            self._next_call += 1
            cid = self._next_call
            self._pending[cid] = p
        return cid, p

    def call(self, job_id: str, op: str, args: list[Any]) -> Any:
        """Send a call and block until its reply; raise the ARCPError it carries."""
        cid, p = self._register(None)
        self.send_now([pm.CALL, job_id, cid, op, args])
        p.event.wait()
        if p.ok:
            return p.value
        raise p.value

    def call_async(self, job_id: str, op: str, args: list[Any],
                   callback: Callable[[bool, Any], None]) -> None:
        """Send a call; `callback(ok, value)` runs in the reader thread with the reply."""
        cid, _ = self._register(callback)
        self.send_now([pm.CALL, job_id, cid, op, args])

    def fail_pending(self, exc: ARCPError) -> None:
        """Wake every waiting call with `exc` (used on cancel)."""
        with self._plock:
            pending, self._pending = self._pending, {}
        for p in pending.values():
            self._resolve(p, False, exc)

    @staticmethod
    def _resolve(p: _Pending, ok: bool, value: Any) -> None:
        p.ok, p.value = ok, value
        p.event.set()
        if p.callback is not None:
            p.callback(ok, value)

    # -- receiving ----------------------------------------------------------
    def _read_loop(self) -> None:
        self._go.wait()
        decoder = self._decoder
        sock_fd = self.sock.fileno()
        try:
            while True:
                fds = [sock_fd, self._wake_r, *self.extra]
                ready, _, _ = select.select(fds, [], [], FLUSH_DELAY if self._buf else None)
                if not ready:
                    self.flush()
                    continue
                for fd in ready:
                    if fd == sock_fd:
                        data = self.sock.recv(1 << 16)
                        if not data:
                            decoder.eof()
                            os._exit(PIPE_ERROR)
                        for frame in decoder.feed(data):
                            self._dispatch(frame)
                    elif fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except BlockingIOError:
                            pass
                    else:
                        self.extra[fd](fd)
        except (OSError, CodecError, ValueError):
            # The supervisor is gone or sent garbage: this worker has no job left to do.
            os._exit(PIPE_ERROR)

    def _dispatch(self, frame: Any) -> None:
        if not isinstance(frame, list) or not frame:
            raise ValueError(f"bad frame from supervisor: {frame!r:.200}")
        tag = frame[0]
        if tag == pm.REPLY:
            _, cid, ok, value = frame
            with self._plock:
                p = self._pending.pop(cid, None)
            if p is None:
                return  # answer to a call abandoned by a cancel
            if not ok:
                try:
                    value = from_wire(value)
                except ValueError:
                    value = InternalError("malformed error reply from the supervisor")
            self._resolve(p, bool(ok), value)
        elif tag == pm.JOB:
            with self.cancel_lock:
                self.jobs_received += 1
            self.jobs.put(frame[1])
        elif tag == pm.CANCEL:
            reason = frame[1] if len(frame) > 1 and isinstance(frame[1], str) else "cancelled"
            with self.cancel_lock:
                self.cancelled_job = self.jobs_received
            self.on_cancel(reason)
            self.fail_pending(Cancelled(f"job cancelled: {reason}"))
        else:
            raise ValueError(f"unknown frame tag from supervisor: {tag!r:.50}")
