"""shared/envelope.py: inbound envelope checks and outbound frames."""

from __future__ import annotations

from typing import Any

import pytest

from shared.envelope import MAX_ID_LEN, Envelope, frame, parse_envelope, request_id_of
from shared.errors import InvalidRequest


def good(**over: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"arcp": "1.1", "id": "req-1", "type": "session.ping", "payload": {"nonce": "n"}}
    env.update(over)
    return {k: v for k, v in env.items() if v is not _DROP}


_DROP = object()


def test_parses_minimal_envelope() -> None:
    env = parse_envelope(good())
    assert env == Envelope(type="session.ping", id="req-1", payload={"nonce": "n"})


def test_parses_optional_fields() -> None:
    env = parse_envelope(good(session_id="sess_1", job_id="job_1", trace_id="t" * 32,
                              extensions={"x-vendor.a.b": 1}))
    assert (env.session_id, env.job_id, env.trace_id) == ("sess_1", "job_1", "t" * 32)
    assert env.extensions == {"x-vendor.a.b": 1}


@pytest.mark.parametrize("payload", [_DROP, None])
def test_absent_or_null_payload_is_empty(payload: Any) -> None:
    assert parse_envelope(good(payload=payload)).payload == {}


@pytest.mark.parametrize("obj", [[1], 42, None, "x", 1.5, True])
def test_non_object_rejected(obj: Any) -> None:
    with pytest.raises(InvalidRequest, match="not a JSON object"):
        parse_envelope(obj)


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"arcp": _DROP}, "arcp"),
        ({"arcp": "1.0"}, "arcp"),
        ({"arcp": 1.1}, "arcp"),
        ({"id": _DROP}, "id"),
        ({"id": ""}, "id"),
        ({"id": 7}, "id"),
        ({"id": None}, "id"),
        ({"id": "x" * (MAX_ID_LEN + 1)}, "id"),
        ({"type": _DROP}, "type"),
        ({"type": ""}, "type"),
        ({"type": ["session.ping"]}, "type"),
        ({"payload": [1]}, "payload"),
        ({"payload": "p"}, "payload"),
        ({"payload": 3}, "payload"),
        ({"extensions": "x"}, "extensions"),
        ({"extensions": [1]}, "extensions"),
        ({"session_id": 1}, "session_id"),
        ({"job_id": {"a": 1}}, "job_id"),
        ({"trace_id": True}, "trace_id"),
    ],
)
def test_malformed_field_named(over: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as ei:
        parse_envelope(good(**over))
    assert f"'{field}'" in ei.value.message
    assert ei.value.code == "INVALID_REQUEST"


def test_id_at_max_length_accepted() -> None:
    assert parse_envelope(good(id="x" * MAX_ID_LEN)).id == "x" * MAX_ID_LEN


@pytest.mark.parametrize("ext", [0, False, [], ""])
def test_falsy_non_object_extensions_rejected(ext: Any) -> None:
    with pytest.raises(InvalidRequest, match="'extensions'"):
        parse_envelope(good(extensions=ext))


def test_request_id_of() -> None:
    assert request_id_of({"id": "r"}) == "r"
    assert request_id_of({"id": 5}) is None
    assert request_id_of({"id": ""}) is None
    assert request_id_of({"id": "x" * (MAX_ID_LEN + 1)}) is None
    assert request_id_of([1]) is None
    assert request_id_of(None) is None


def test_frame_omits_none_fields() -> None:
    env = frame("session.pong", "id1", {"a": 1})
    assert env == {"arcp": "1.1", "id": "id1", "type": "session.pong", "payload": {"a": 1}}
    for key in ("session_id", "job_id", "trace_id", "event_seq", "extensions"):
        assert key not in env


def test_frame_includes_given_fields() -> None:
    env = frame("job.event", "id1", {}, session_id="s", job_id="j", trace_id="t", event_seq=0,
                extensions={"x": 1})
    assert env["session_id"] == "s" and env["job_id"] == "j" and env["trace_id"] == "t"
    assert env["event_seq"] == 0  # zero is present, not dropped as falsy
    assert env["extensions"] == {"x": 1}
    assert None not in env.values()


def test_frame_output_parses_back() -> None:
    env = frame("session.ping", "id1", {"nonce": "n"}, session_id="s")
    parsed = parse_envelope(env)
    assert parsed.type == "session.ping" and parsed.session_id == "s"
