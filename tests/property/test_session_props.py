"""Session.receive on arbitrary input: never raises, every reply is a valid ARCP frame."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import CLIENT_TYPES
from tests.unit.test_session import Harness

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
payloads = st.fixed_dictionaries({}, optional={
    k: json_values | st.text(max_size=8)
    for k in ("nonce", "job_id", "reason", "last_processed_seq", "agent", "filter", "capabilities")
})
frames = st.fixed_dictionaries(
    {"arcp": st.just("1.1") | json_values},
    optional={
        "id": st.text(max_size=12) | json_values,
        "type": st.sampled_from(sorted(CLIENT_TYPES) + ["job.frobnicate"]) | json_values,
        "payload": payloads | json_values,
        "job_id": st.text(max_size=8) | json_values,
        "extensions": json_values,
    },
)


def _check_replies(h: Harness) -> None:
    out = h.drain()
    assert len(out) <= 1
    for f in out:
        assert f["arcp"] == "1.1" and isinstance(f["id"], str) and f["type"].startswith("session.")
        assert f["session_id"] == h.session.id
        if f["type"] == "session.error":
            assert f["payload"]["message"]


@settings(max_examples=150, deadline=None)
@given(st.lists(frames, max_size=5))
def test_envelope_shaped_frames(objs: list[dict[str, Any]]) -> None:
    h = Harness()
    for obj in objs:
        h.session.receive(orjson.dumps(obj), h.now)
        _check_replies(h)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes(data: bytes) -> None:
    h = Harness()
    h.session.receive(data, h.now)
    _check_replies(h)
