"""Properties of the pipe codec: round-trips under any split; hostile bytes only raise CodecError."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.pipe_codec import CodecError, FrameDecoder, encode

leaves = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=50) | st.binary(max_size=50)
)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def _splits(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(blob) + 1) for c in cuts})
    out, prev = [], 0
    for p in points:
        out.append(blob[prev:p])
        prev = p
    out.append(blob[prev:])
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(values, max_size=8))
def test_round_trip_whole(vals: list[Any]) -> None:
    dec = FrameDecoder()
    assert dec.feed(b"".join(encode(v) for v in vals)) == vals
    dec.eof()


@settings(max_examples=100, deadline=None)
@given(st.lists(values, max_size=5))
def test_round_trip_byte_at_a_time(vals: list[Any]) -> None:
    blob = b"".join(encode(v) for v in vals)
    dec = FrameDecoder()
    out: list[Any] = []
    for i in range(len(blob)):
        out += dec.feed(blob[i:i + 1])
    assert out == vals
    dec.eof()


@settings(max_examples=200, deadline=None)
@given(st.lists(values, max_size=8), st.lists(st.integers(min_value=0), max_size=20))
def test_round_trip_random_splits(vals: list[Any], cuts: list[int]) -> None:
    blob = b"".join(encode(v) for v in vals)
    dec = FrameDecoder()
    out: list[Any] = []
    for piece in _splits(blob, cuts):
        out += dec.feed(piece)
    assert out == vals
    dec.eof()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=10))
def test_random_bytes_yield_frames_or_codec_error(blob: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder(max_frame=4096)
    try:
        for piece in _splits(blob, cuts):
            dec.feed(piece)
        dec.eof()
    except CodecError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=200), st.binary(max_size=200))
def test_framed_random_payload_yields_frame_or_codec_error(n: int, payload: bytes) -> None:
    """A well-formed header around arbitrary bytes: a frame or CodecError, nothing else."""
    payload = (payload + b"\x00" * n)[:n]
    try:
        FrameDecoder().feed(n.to_bytes(4, "big") + payload)
    except CodecError:
        pass
