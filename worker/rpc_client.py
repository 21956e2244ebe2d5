"""The worker's end of the pipe: framed sends, blocking calls, and a reader thread.

Every frame the agent's calls produce goes out under one lock, so frames from
several agent threads never interleave. A call blocks its caller until the
supervisor's reply arrives; the reader thread delivers replies, new jobs and
cancel requests. If the pipe breaks, the supervisor is gone and so is the job:
the process exits at once.
"""

from __future__ import annotations

import os
import queue
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


class Channel:
    """Framed msgpack over the worker's socket to the supervisor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._wlock = threading.Lock()
        self._plock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._next_call = 0
        self.jobs: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=1)
        self.on_cancel: Callable[[str], None] = lambda reason: None
        self._decoder = FrameDecoder(pm.MAX_PIPE_FRAME)
        self._go = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="arcp-pipe", daemon=True)

    def start(self) -> None:
        """Start the reader thread; it waits until `first_job()` hands the pipe over."""
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
        data = encode(obj, pm.MAX_PIPE_FRAME)
        with self._wlock:
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
        self.send([pm.CALL, job_id, cid, op, args])
        p.event.wait()
        if p.ok:
            return p.value
        raise p.value

    def call_async(self, job_id: str, op: str, args: list[Any],
                   callback: Callable[[bool, Any], None]) -> None:
        """Send a call; `callback(ok, value)` runs in the reader thread with the reply."""
        cid, _ = self._register(callback)
        self.send([pm.CALL, job_id, cid, op, args])

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
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    decoder.eof()
                    os._exit(PIPE_ERROR)
                for frame in decoder.feed(data):
                    self._dispatch(frame)
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
            self.jobs.put(frame[1])
        elif tag == pm.CANCEL:
            reason = frame[1] if len(frame) > 1 and isinstance(frame[1], str) else "cancelled"
            self.on_cancel(reason)
            self.fail_pending(Cancelled(f"job cancelled: {reason}"))
        else:
            raise ValueError(f"unknown frame tag from supervisor: {tag!r:.50}")
