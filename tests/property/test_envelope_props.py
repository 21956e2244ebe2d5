"""Properties of envelope parsing: any JSON value parses or raises InvalidRequest."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.envelope import PROTOCOL_VERSION, Envelope, frame, parse_envelope
from shared.errors import InvalidRequest

json_leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False,
                                                                                        allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=15,
)
field_values: st.SearchStrategy[Any] = json_values | st.sampled_from(["1.1", "session.ping", "req-1", "job_1"]) | st.just({})
envelope_like = st.fixed_dictionaries(
    {},
    optional={k: field_values for k in ("arcp", "id", "type", "payload", "extensions", "session_id",
                                        "job_id", "trace_id")},
)


def _check(obj: Any) -> None:
    try:
        env = parse_envelope(obj)
    except InvalidRequest as e:
        assert e.code == "INVALID_REQUEST" and e.message
        return
    assert isinstance(env, Envelope)
    assert obj["arcp"] == PROTOCOL_VERSION
    assert isinstance(env.id, str) and 0 < len(env.id) <= 128
    assert isinstance(env.type, str) and env.type
    assert isinstance(env.payload, dict) and isinstance(env.extensions, dict)
    for v in (env.session_id, env.job_id, env.trace_id):
        assert v is None or isinstance(v, str)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_parses_or_invalid_request(obj: Any) -> None:
    _check(obj)


@settings(max_examples=300, deadline=None)
@given(envelope_like)
def test_envelope_shaped_objects_parse_or_invalid_request(obj: dict[str, Any]) -> None:
    _check(obj)


@settings(max_examples=300, deadline=None)
@given(envelope_like)
def test_parsed_survives_json_round_trip(obj: dict[str, Any]) -> None:
    try:
        env = parse_envelope(obj)
    except InvalidRequest:
        return
    again = parse_envelope(orjson.loads(orjson.dumps(obj)))
    assert again == env


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=128),
    st.dictionaries(st.text(max_size=5), json_values, max_size=3),
    st.none() | st.text(max_size=10), st.none() | st.text(max_size=10), st.none() | st.text(max_size=10),
    st.none() | st.integers(0, 2**40),
)
def test_frame_round_trip(type_: str, id_: str, payload: dict[str, Any], sid: str | None, jid: str | None,
                          tid: str | None, seq: int | None) -> None:
    env = frame(type_, id_, payload, session_id=sid, job_id=jid, trace_id=tid, event_seq=seq)
    assert None not in env.values()
    parsed = parse_envelope(orjson.loads(orjson.dumps(env)))
    assert (parsed.type, parsed.id, parsed.payload) == (type_, id_, payload)
    assert (parsed.session_id, parsed.job_id, parsed.trace_id) == (sid, jid, tid)
