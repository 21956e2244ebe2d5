"""The ARCP v1.1 envelope: parsing inbound frames and building outbound ones.

Pure functions over dicts; no I/O. Inbound parsing raises InvalidRequest with
a message naming what was wrong; outbound frames omit absent fields (never
`null`), as both official SDKs do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.errors import InvalidRequest

PROTOCOL_VERSION = "1.1"
MAX_ID_LEN = 128


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated inbound envelope."""

    type: str
    id: str
    payload: dict[str, Any]
    session_id: str | None = None
    job_id: str | None = None
    trace_id: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)


def request_id_of(obj: Any) -> str | None:
    """The frame's `id` when it is a usable string (for `request_id` on errors)."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN:
            return rid
    return None


def parse_envelope(obj: Any) -> Envelope:
    """Check the envelope shape of a decoded JSON value; InvalidRequest if it fails."""
    if not isinstance(obj, dict):
        raise InvalidRequest(f"frame is not a JSON object (got {type(obj).__name__})")
    version = obj.get("arcp")
    if version != PROTOCOL_VERSION:
        raise InvalidRequest(f"envelope field 'arcp' must be \"1.1\" (got {version!r})")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise InvalidRequest("envelope field 'id' is missing or not a non-empty string")
    if len(rid) > MAX_ID_LEN:
        raise InvalidRequest(f"envelope field 'id' is longer than {MAX_ID_LEN} characters")
    typ = obj.get("type")
    if not isinstance(typ, str) or not typ:
        raise InvalidRequest("envelope field 'type' is missing or not a non-empty string")
    payload = obj.get("payload", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise InvalidRequest(f"envelope field 'payload' must be an object (got {type(payload).__name__})")
    ext = obj.get("extensions")
    if ext is None:
        ext = {}
    if not isinstance(ext, dict):
        raise InvalidRequest("envelope field 'extensions' must be an object")
    out: dict[str, str | None] = {}
    for name in ("session_id", "job_id", "trace_id"):
        v = obj.get(name)
        if v is not None and not isinstance(v, str):
            raise InvalidRequest(f"envelope field '{name}' must be a string")
        out[name] = v
    return Envelope(type=typ, id=rid, payload=payload, extensions=ext, **out)


def frame(
    type_: str,
    id_: str,
    payload: dict[str, Any],
    *,
    session_id: str | None = None,
    job_id: str | None = None,
    trace_id: str | None = None,
    event_seq: int | None = None,
    extensions: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An outbound envelope with absent fields omitted."""
    env: dict[str, Any] = {"arcp": PROTOCOL_VERSION, "id": id_, "type": type_}
    if session_id is not None:
        env["session_id"] = session_id
    if job_id is not None:
        env["job_id"] = job_id
    if trace_id is not None:
        env["trace_id"] = trace_id
    if event_seq is not None:
        env["event_seq"] = event_seq
    if extensions:
        env["extensions"] = extensions
    env["payload"] = payload
    return env
