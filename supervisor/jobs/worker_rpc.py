"""Checks every frame a worker sends and turns it into event bodies or calls.

Pure and hostile-input safe: anything that is not exactly what an honest
worker sends raises WorkerProtocolError, and the job ends with INTERNAL_ERROR. A call
names an op of the call table (calls.py), which bounds its arguments and answers it.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared import pipe_messages as pm
from shared.errors import from_wire
from shared.ids import new_id
from shared.messages import LOG_LEVELS, RESERVED_PHASES
from supervisor.jobs.calls import CALLS


class WorkerProtocolError(Exception):
    """A worker frame that is malformed, oversized, or about another job."""


@dataclass(slots=True)
class Event:
    kind: str
    body: dict[str, Any]


@dataclass(slots=True)
class Call:
    call_id: int
    op: str
    args: list[Any]


@dataclass(slots=True)
class Done:
    value: Any
    left: list[str] = field(default_factory=list)  # what the job left in the worker (pipe_messages)


@dataclass(slots=True)
class Fail:
    error: dict[str, Any]
    traceback: str | None
    left: list[str] = field(default_factory=list)


Action = Event | Call | Done | Fail


def _opt_str(v: Any, what: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise WorkerProtocolError(f"{what} is not a string")
    return v


def _req_str(v: Any, what: str) -> str:
    if not isinstance(v, str) or not v:
        raise WorkerProtocolError(f"{what} is not a non-empty string")
    return v


def _int(v: Any, what: str, optional: bool = False) -> int | None:
    if v is None and optional:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise WorkerProtocolError(f"{what} is not an integer >= 0")
    return v


def _json(v: Any, what: str) -> Any:
    try:
        orjson.dumps(v)
    except TypeError as e:
        raise WorkerProtocolError(f"{what} is not JSON data: {e}") from e
    return v


class StreamState:
    """One streamed result: id, fixed encoding, chunk numbering, total size."""

    def __init__(self, encoding: str, max_bytes: int) -> None:
        self.result_id = new_id("res")
        self.encoding = encoding
        self.max_bytes = max_bytes
        self.seq = 0
        self.size = 0
        self.closed = False

    def body(self, data: str, more: bool) -> dict[str, Any]:
        b = {"result_id": self.result_id, "chunk_seq": self.seq, "data": data,
             "encoding": self.encoding, "more": more}
        self.seq += 1
        return b


class WorkerFrames:
    """Per-job decoder of worker frames."""

    def __init__(self, job_id: str, max_result_bytes: int, max_chunk_text: int) -> None:
        self.job_id = job_id
        self.max_result_bytes = max_result_bytes
        self.max_chunk_text = max_chunk_text  # max characters of chunk `data` per frame
        self.stream: StreamState | None = None

    def actions(self, frame: Any) -> list[Action]:
        if not isinstance(frame, list) or len(frame) < 3:
            raise WorkerProtocolError("frame is not a list of at least three items")
        tag, job_id = frame[0], frame[1]
        if job_id != self.job_id:
            raise WorkerProtocolError(f"frame is about another job ({str(job_id)[:40]!r})")
        if tag == pm.EV:
            if len(frame) != 4 or not isinstance(frame[3], list):
                raise WorkerProtocolError("event frame is not [ev, job, op, args]")
            return self._event(frame[2], frame[3])
        if tag == pm.CALL:
            if len(frame) != 5 or not isinstance(frame[4], list):
                raise WorkerProtocolError("call frame is not [call, job, id, op, args]")
            _int(frame[2], "call id")
            if not isinstance(frame[3], str) or frame[3] not in CALLS:
                raise WorkerProtocolError(f"unknown call {str(frame[3])[:40]!r}")
            return [Call(frame[2], frame[3], frame[4])]
        if tag == pm.DONE:
            if len(frame) not in (3, 4):
                raise WorkerProtocolError("done frame is not [done, job, value, left?]")
            return self._finish_stream() + [Done(_json(frame[2], "result"), _left(frame))]
        if tag == pm.FAIL:
            if len(frame) not in (3, 4):
                raise WorkerProtocolError("fail frame is not [fail, job, error, left?]")
            raw = frame[2]
            try:
                err = from_wire(raw).to_wire()
            except ValueError as e:
                raise WorkerProtocolError(f"fail frame carries a malformed error: {e}") from e
            if "details" in err:
                _json(err["details"], "error details")
            tb = raw.get("traceback") if isinstance(raw.get("traceback"), str) else None
            return [Fail(err, tb, _left(frame))]
        raise WorkerProtocolError(f"unknown frame tag {str(tag)[:40]!r}")

    def _event(self, op: Any, a: list[Any]) -> list[Action]:
        if not isinstance(op, str):
            raise WorkerProtocolError("event op is not a string")
        if op == "log":
            level, message, fields = _args(a, 3, "log")
            if not isinstance(level, str) or level not in LOG_LEVELS:
                raise WorkerProtocolError(f"log level {str(level)[:20]!r} is not valid")
            if not isinstance(message, str):
                raise WorkerProtocolError("log message is not a string")
            body: dict[str, Any] = {"level": level, "message": message}
            if fields is not None:
                if not isinstance(fields, dict):
                    raise WorkerProtocolError("log fields are not an object")
                if fields:  # sent under both names (Go: fields, Python: attributes)
                    _json(fields, "log fields")
                    body["fields"] = fields
                    body["attributes"] = fields
            return [Event("log", body)]
        if op == "thought":
            (text,) = _args(a, 1, "thought")
            if not isinstance(text, str):
                raise WorkerProtocolError("thought text is not a string")
            return [Event("thought", {"text": text})]
        if op == "status":
            phase, message = _args(a, 2, "status")
            phase = _req_str(phase, "status phase")
            if phase in RESERVED_PHASES:
                raise WorkerProtocolError(f"status phase {phase!r} is reserved")
            body = {"phase": phase}
            if _opt_str(message, "status message") is not None:
                body["message"] = message
            return [Event("status", body)]
        if op == "metric":
            name, value, unit, dims = _args(a, 4, "metric")
            body = {"name": _req_str(name, "metric name")}
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise WorkerProtocolError("metric value is not a finite number")
            body["value"] = value
            if _opt_str(unit, "metric unit") is not None:
                body["unit"] = unit
            if dims is not None:
                if not isinstance(dims, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in dims.items()):
                    raise WorkerProtocolError("metric dims are not a string map")
                body["dimensions"] = dims
            return [Event("metric", body)]
        if op == "progress":
            current, total, units, message = _args(a, 4, "progress")
            body = {"current": _int(current, "progress current")}
            if total is not None:
                body["total"] = _int(total, "progress total")
                if body["current"] > body["total"]:
                    raise WorkerProtocolError("progress current exceeds total")
            if _opt_str(units, "progress units") is not None:
                body["units"] = units
            if _opt_str(message, "progress message") is not None:
                body["message"] = message
            return [Event("progress", body)]
        if op == "tool_result":
            call_id, result = _args(a, 2, "tool_result")
            return [Event("tool_result", {"call_id": _req_str(call_id, "call_id"),
                                          "result": _json(result, "tool result")})]
        if op == "tool_error":
            call_id, err = _args(a, 2, "tool_error")
            try:
                wire = from_wire(err).to_wire()
            except ValueError as e:
                raise WorkerProtocolError(f"tool error is malformed: {e}") from e
            if "details" in wire:
                _json(wire["details"], "tool error details")
            return [Event("tool_result", {"call_id": _req_str(call_id, "call_id"), "error": wire})]
        if op == "artifact_ref":
            uri, ctype, size, sha = _args(a, 4, "artifact_ref")
            body = {"uri": _req_str(uri, "artifact uri"), "content_type": _req_str(ctype, "content_type")}
            if size is not None:
                body["byte_size"] = _int(size, "artifact byte_size")
            if _opt_str(sha, "artifact sha256") is not None:
                body["sha256"] = sha
            return [Event("artifact_ref", body)]
        if op == "stream_open":
            (encoding,) = _args(a, 1, "stream_open")
            if encoding not in ("utf8", "base64"):
                raise WorkerProtocolError("stream encoding is not utf8 or base64")
            if self.stream is not None:
                raise WorkerProtocolError("a second result stream was opened")
            self.stream = StreamState(encoding, self.max_result_bytes)
            return []
        if op == "chunk":
            (data,) = _args(a, 1, "chunk")
            return self._chunk(data)
        if op == "stream_close":
            _args(a, 0, "stream_close")
            return self._finish_stream()
        raise WorkerProtocolError(f"unknown event op {str(op)[:40]!r}")  # pragma: no cover

    def _chunk(self, data: Any) -> list[Action]:
        s = self.stream
        if s is None or s.closed:
            raise WorkerProtocolError("result chunk outside an open stream")
        if s.encoding == "utf8":
            if not isinstance(data, str):
                raise WorkerProtocolError("utf8 chunk is not text")
            n = len(data.encode("utf-8"))
        else:
            if not isinstance(data, bytes):
                raise WorkerProtocolError("base64 chunk is not bytes")
            n = len(data)
        if s.size + n > s.max_bytes:
            raise WorkerProtocolError(f"streamed result exceeds {s.max_bytes} bytes")
        s.size += n
        out: list[Action] = []
        if s.encoding == "base64":
            step = (self.max_chunk_text // 4) * 3
            for off in range(0, len(data), step):
                text = base64.b64encode(data[off : off + step]).decode("ascii")
                out.append(Event("result_chunk", s.body(text, True)))
        else:
            # JSON escaping can grow text up to 6x; cut by encoded size.
            for piece in _split_text(data, self.max_chunk_text):
                out.append(Event("result_chunk", s.body(piece, True)))
        return out

    def _finish_stream(self) -> list[Action]:
        s = self.stream
        if s is None or s.closed:
            return []
        s.closed = True
        return [Event("result_chunk", s.body("", False))]


def _left(frame: list[Any]) -> list[str]:
    """The optional last item of a done or fail frame: what the job left in the worker."""
    if len(frame) < 4:
        return []
    left = frame[3]
    if not isinstance(left, list) or not all(isinstance(x, str) and x in pm.LEFT_KINDS for x in left):
        raise WorkerProtocolError(f"what the job left is not a list of {sorted(pm.LEFT_KINDS)}")
    return sorted(set(left))


def _split_text(text: str, max_encoded: int) -> list[str]:
    if len(text) * 6 <= max_encoded or len(orjson.dumps(text)) <= max_encoded:
        return [text]
    mid = len(text) // 2
    return _split_text(text[:mid], max_encoded) + _split_text(text[mid:], max_encoded)


def _args(a: list[Any], n: int, what: str) -> list[Any]:
    if len(a) != n:
        raise WorkerProtocolError(f"{what} takes {n} arguments, got {len(a)}")
    return a
