"""Properties of ids and timestamps."""

from __future__ import annotations

from datetime import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.ids import format_ts, parse_trace_id, parse_ts

hex32 = st.text(alphabet="0123456789abcdefABCDEF", min_size=32, max_size=32)


@settings(max_examples=300, deadline=None)
@given(hex32)
def test_parse_trace_id_hex(t: str) -> None:
    if set(t) == {"0"}:
        return
    assert parse_trace_id(t) == t.lower()
    tp = f"00-{t}-00f067aa0ba902b7-01"
    assert parse_trace_id(tp) == t.lower()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_trace_id_text_or_value_error(t: str) -> None:
    try:
        out = parse_trace_id(t)
    except ValueError:
        return
    assert len(out) == 32 and set(out) <= set("0123456789abcdef") and out != "0" * 32


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=253402300799, allow_nan=False))
def test_format_ts_parses_back(epoch: float) -> None:
    s = format_ts(epoch)
    assert s.endswith("Z")
    dt = datetime.fromisoformat(s)
    assert abs(dt.timestamp() - epoch) < 2e-6 * max(1.0, epoch / 1e9)
    assert parse_ts(s) == dt
