"""JobContext: the agent's handle on its job, a proxy to the supervisor.

Every method checks its arguments here, so the agent gets a clear error at
the call that was wrong; the supervisor checks everything again, because it
trusts nothing a worker sends. Calls that need an answer block until the
supervisor replies. Once the job is cancelled every call raises Cancelled.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from types import TracebackType
from typing import Any

from worker import json_value

from shared import pipe_messages as pm
from shared.errors import ARCPError, Cancelled, InternalError, InvalidRequest, from_wire
from shared.messages import LOG_LEVELS, RESERVED_PHASES
from worker.rpc_client import Channel


def _json_value(value: Any, what: str, limit: int) -> Any:
    """`value` as plain JSON data (lists, dicts, str, numbers); InvalidRequest if it is not."""
    try:
        raw = json_value.dumps(value)
    except TypeError as e:
        raise InvalidRequest(f"{what} is not JSON-serialisable: {e}") from e
    if len(raw) > limit:
        raise InvalidRequest(f"{what} is {len(raw)} bytes encoded, over the {limit}-byte event limit")
    return json_value.loads(raw)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, Decimal)) and not isinstance(v, bool)


class JobContext:
    """The contract's JobContext (contract.md "JobContext")."""

    def __init__(self, channel: Channel, spec: dict[str, Any]) -> None:
        self._ch = channel
        self.job_id: str = spec["job_id"]
        self.session_id: str = spec["session_id"]
        self.trace_id: str = spec["trace_id"]
        self.agent: str = spec["agent"]
        self.lease: dict[str, list[str]] = spec.get("lease") or {}
        self.lease_constraints: dict[str, Any] = spec.get("lease_constraints") or {}
        # Provisioned credentials (protocol.md §8.9): {id, scheme, value, endpoint?, ...}
        self.credentials: list[dict[str, Any]] = spec.get("credentials") or []
        self._max_event = int(spec.get("max_event_bytes") or 512 * 1024)
        self._max_result = int(spec.get("max_result_bytes") or 32 * 1024 * 1024)
        self._chunk = int(spec.get("chunk_size") or 256 * 1024)
        self._cancelled = False
        self._stream: ResultWriter | None = None
        self._stream_opened = False

    # -- state --------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _mark_cancelled(self) -> None:
        self._cancelled = True

    def _check(self) -> None:
        if self._cancelled:
            raise Cancelled("job cancelled")

    def _ev(self, op: str, args: list[Any]) -> None:
        self._check()
        self._ch.send([pm.EV, self.job_id, op, args])

    def _call(self, op: str, args: list[Any]) -> Any:
        self._check()
        return self._ch.call(self.job_id, op, args)

    async def _acall(self, op: str, args: list[Any]) -> Any:
        self._check()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def done(ok: bool, value: Any) -> None:
            def settle() -> None:
                if fut.done():
                    return
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            loop.call_soon_threadsafe(settle)

        self._ch.call_async(self.job_id, op, args, done)
        return await fut

    # -- events -------------------------------------------------------------
    def log(self, level: str, message: str, **attrs: Any) -> None:
        lvl = level.lower() if isinstance(level, str) else level
        if lvl == "warning":
            lvl = "warn"
        if lvl not in LOG_LEVELS:
            raise InvalidRequest(f"log level {level!r} is not one of debug, info, warn, error")
        if not isinstance(message, str):
            raise InvalidRequest("log message must be a string")
        fields = _json_value(attrs, "log attributes", self._max_event) if attrs else None
        if len(message) > self._max_event:
            raise InvalidRequest(f"log message over the {self._max_event}-byte event limit")
        self._ev("log", [lvl, message, fields])

    def thought(self, text: str) -> None:
        if not isinstance(text, str):
            raise InvalidRequest("thought text must be a string")
        if len(text) > self._max_event:
            raise InvalidRequest(f"thought over the {self._max_event}-byte event limit")
        self._ev("thought", [text])

    def status(self, phase: str, message: str | None = None) -> None:
        if not isinstance(phase, str) or not phase:
            raise InvalidRequest("status phase must be a non-empty string")
        if phase in RESERVED_PHASES:
            raise InvalidRequest(f"status phase {phase!r} is reserved for the runtime")
        if message is not None and not isinstance(message, str):
            raise InvalidRequest("status message must be a string")
        self._ev("status", [phase, message])

    def metric(self, name: str, value: float, unit: str | None = None,
               dims: dict[str, str] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidRequest("metric name must be a non-empty string")
        if not _is_number(value):
            raise InvalidRequest(f"metric value must be a number (got {type(value).__name__})")
        if isinstance(value, Decimal):
            value = float(value)
        if name.startswith("cost.") and value < 0:
            raise InvalidRequest(f"cost metric {name!r} has a negative value {value}; costs never credit")
        if unit is not None and not isinstance(unit, str):
            raise InvalidRequest("metric unit must be a string")
        if dims is not None:
            if not isinstance(dims, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in dims.items()
            ):
                raise InvalidRequest("metric dims must map strings to strings")
        self._ev("metric", [name, value, unit, dims])

    def progress(self, current: int, total: int | None = None, units: str | None = None,
                 message: str | None = None) -> None:
        if not isinstance(current, int) or isinstance(current, bool) or current < 0:
            raise InvalidRequest("progress current must be an integer >= 0")
        if total is not None:
            if not isinstance(total, int) or isinstance(total, bool) or total < 0:
                raise InvalidRequest("progress total must be an integer >= 0")
            if current > total:
                raise InvalidRequest(f"progress current {current} exceeds total {total}")
        if units is not None and not isinstance(units, str):
            raise InvalidRequest("progress units must be a string")
        if message is not None and not isinstance(message, str):
            raise InvalidRequest("progress message must be a string")
        self._ev("progress", [current, total, units, message])

    def tool_call(self, tool: str, args: Any) -> str:
        if not isinstance(tool, str) or not tool:
            raise InvalidRequest("tool name must be a non-empty string")
        call_id: str = self._call("tool_call", [tool, _json_value(args, "tool args", self._max_event)])
        return call_id

    def tool_result(self, call_id: str, result: Any) -> None:
        if not isinstance(call_id, str):
            raise InvalidRequest("tool call_id must be a string")
        self._ev("tool_result", [call_id, _json_value(result, "tool result", self._max_event)])

    def tool_error(self, call_id: str, error: Any) -> None:
        if not isinstance(call_id, str):
            raise InvalidRequest("tool call_id must be a string")
        if isinstance(error, ARCPError):
            err = error.to_wire()
        elif isinstance(error, dict):
            try:
                err = from_wire(error).to_wire()
            except ValueError as e:
                raise InvalidRequest(f"tool error: {e}") from e
        elif isinstance(error, str):
            err = InternalError(error).to_wire()
        else:
            raise InvalidRequest("tool error must be an ARCPError, an error dict or a string")
        self._ev("tool_error", [call_id, _json_value(err, "tool error", self._max_event)])

    def artifact_ref(self, uri: str, content_type: str, byte_size: int | None = None,
                     sha256: str | None = None) -> None:
        if not isinstance(uri, str) or not uri:
            raise InvalidRequest("artifact uri must be a non-empty string")
        if not isinstance(content_type, str) or not content_type:
            raise InvalidRequest("artifact content_type must be a non-empty string")
        if byte_size is not None and (not isinstance(byte_size, int) or isinstance(byte_size, bool)
                                      or byte_size < 0):
            raise InvalidRequest("artifact byte_size must be an integer >= 0")
        if sha256 is not None and not isinstance(sha256, str):
            raise InvalidRequest("artifact sha256 must be a string")
        self._ev("artifact_ref", [uri, content_type, byte_size, sha256])

    # -- authority (answered by the supervisor) ------------------------------
    def budget(self) -> dict[str, Decimal]:
        raw = self._call("budget", [])
        return {cur: Decimal(v) for cur, v in raw.items()}

    async def abudget(self) -> dict[str, Decimal]:
        raw = await self._acall("budget", [])
        return {cur: Decimal(v) for cur, v in raw.items()}

    def reserve_budget(self, amounts: dict[str, Any]) -> None:
        self._call("reserve_budget", [_amounts(amounts)])

    async def areserve_budget(self, amounts: dict[str, Any]) -> None:
        await self._acall("reserve_budget", [_amounts(amounts)])

    def validate_lease_op(self, capability: str, target: str) -> None:
        _op_args(capability, target)
        self._call("validate_lease_op", [capability, target])

    async def avalidate_lease_op(self, capability: str, target: str) -> None:
        _op_args(capability, target)
        await self._acall("validate_lease_op", [capability, target])

    def delegate(self, agent: str, input: Any, lease: dict[str, list[str]] | None = None) -> str:
        child: str = self._call("delegate", [agent, _json_value(input, "delegate input", self._max_event),
                                             lease])
        return child

    async def adelegate(self, agent: str, input: Any, lease: dict[str, list[str]] | None = None) -> str:
        child: str = await self._acall(
            "delegate", [agent, _json_value(input, "delegate input", self._max_event), lease])
        return child

    def rotate_credential(self, credential_id: str, new_value: str) -> None:
        if not isinstance(credential_id, str) or not isinstance(new_value, str):
            raise InvalidRequest("credential id and value must be strings")
        self._call("rotate_credential", [credential_id, new_value])

    # -- streamed result ----------------------------------------------------
    def stream_result(self, encoding: str = "utf8") -> ResultWriter:
        if encoding not in ("utf8", "base64"):
            raise InvalidRequest(f"stream encoding must be 'utf8' or 'base64', not {encoding!r}")
        if self._stream_opened:
            raise InvalidRequest("a job streams at most one result")
        self._ev("stream_open", [encoding])
        self._stream_opened = True
        self._stream = ResultWriter(self, encoding)
        return self._stream

    def _close_stream(self) -> None:
        if self._stream is not None and not self._stream.closed:
            self._stream.close()

    @property
    def streamed(self) -> bool:
        return self._stream_opened


def _amounts(amounts: Any) -> dict[str, str]:
    if not isinstance(amounts, dict) or not amounts:
        raise InvalidRequest("reserve_budget takes a non-empty {currency: amount} mapping")
    out = {}
    for cur, amt in amounts.items():
        if not isinstance(cur, str):
            raise InvalidRequest("budget currency must be a string")
        if isinstance(amt, bool) or not isinstance(amt, (str, int, float, Decimal)):
            raise InvalidRequest(f"budget amount for {cur} must be a number or a decimal string")
        out[cur] = str(amt)
    return out


def _op_args(capability: Any, target: Any) -> None:
    if not isinstance(capability, str) or not isinstance(target, str):
        raise InvalidRequest("validate_lease_op takes a capability string and a target string")


class ResultWriter:
    """Writes one streamed result; a context manager that closes the stream."""

    def __init__(self, job: JobContext, encoding: str) -> None:
        self._job = job
        self.encoding = encoding
        self.closed = False
        self.size = 0

    def write(self, data: str | bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise InvalidRequest("write on a closed result stream")
        if self.encoding == "utf8":
            if isinstance(data, (bytes, bytearray, memoryview)):
                try:
                    data = bytes(data).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InvalidRequest(f"utf8 result stream got bytes that are not UTF-8: {e}") from e
            if not isinstance(data, str):
                raise InvalidRequest("utf8 result stream takes str or UTF-8 bytes")
            nbytes = len(data.encode("utf-8"))
        else:
            if isinstance(data, str):
                data = data.encode("utf-8")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidRequest("base64 result stream takes bytes")
            data = bytes(data)
            nbytes = len(data)
        limit = self._job._max_result
        if self.size + nbytes > limit:
            raise InternalError(
                f"streamed result exceeds {limit} bytes (max-result-bytes); the write of {nbytes} bytes was refused"
            )
        self.size += nbytes
        step = self._job._chunk
        if len(data) <= step:
            self._job._ev("chunk", [data])
        else:
            for off in range(0, len(data), step):
                self._job._ev("chunk", [data[off : off + step]])

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._job._ev("stream_close", [])

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        if et is None:
            self.close()

