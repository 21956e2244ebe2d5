"""Properties of the error wire form."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import CODES, ARCPError, error, from_wire

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(CODES)), st.text(), st.none() | st.booleans(),
       st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_round_trip(code: str, message: str, retryable: bool | None, details: dict[str, Any] | None) -> None:
    e = error(code, message, retryable=retryable, details=details)
    back = from_wire(e.to_wire())
    assert type(back) is type(e) and back.code == code
    assert back.to_wire() == e.to_wire()


hashable_json = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "code": hashable_json | st.sampled_from(sorted(CODES)),
    "message": hashable_json | st.lists(st.integers(), max_size=2),
    "retryable": hashable_json | st.lists(st.integers(), max_size=2),
    "details": json_values,
}))
def test_from_wire_error_or_value_error(obj: dict[str, Any]) -> None:
    """Any dict whose code is hashable: an ARCPError or ValueError (unhashable codes: see the unit tests)."""
    try:
        e = from_wire(obj)
    except ValueError:
        return
    assert isinstance(e, ARCPError) and e.code == obj["code"]
