"""shared/pipe_codec.py: length-prefixed msgpack frames."""

from __future__ import annotations

import msgpack
import pytest

from shared.pipe_codec import DEFAULT_MAX_FRAME, HEADER, CodecError, FrameDecoder, encode


def test_encode_is_header_plus_msgpack() -> None:
    data = encode(["ev", "job_1", "log", ["info", "m", None]])
    (n,) = HEADER.unpack_from(data, 0)
    assert n == len(data) - HEADER.size
    assert msgpack.unpackb(data[HEADER.size:], raw=False) == ["ev", "job_1", "log", ["info", "m", None]]


def test_round_trip_whole_and_bytewise() -> None:
    values = [["job", {"job_id": "j", "input": {"a": [1, 2.5, None, True]}}], b"\x00\xff", "text", 0, -1]
    blob = b"".join(encode(v) for v in values)
    assert FrameDecoder().feed(blob) == values
    dec = FrameDecoder()
    out: list[object] = []
    for i in range(len(blob)):
        out += dec.feed(blob[i:i + 1])
    assert out == values
    dec.eof()


def test_partial_frame_yields_nothing_until_complete() -> None:
    data = encode({"k": "v"})
    dec = FrameDecoder()
    assert dec.feed(data[:2]) == []
    assert dec.feed(data[2:-1]) == []
    assert dec.feed(data[-1:]) == [{"k": "v"}]
    dec.eof()


def test_encode_rejects_unpackable_value() -> None:
    with pytest.raises(CodecError):
        encode(object())


def test_encode_rejects_oversized_frame() -> None:
    with pytest.raises(CodecError, match="exceeds"):
        encode(b"x" * 100, max_frame=50)


def test_oversized_header_rejected_before_payload() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(CodecError, match="exceeds"):
        dec.feed(HEADER.pack(1025))


def test_oversized_header_default_limit() -> None:
    with pytest.raises(CodecError):
        FrameDecoder().feed(HEADER.pack(DEFAULT_MAX_FRAME + 1))


def test_header_at_limit_is_buffered_not_rejected() -> None:
    dec = FrameDecoder(max_frame=1024)
    assert dec.feed(HEADER.pack(1024) + b"\x00" * 10) == []
    with pytest.raises(CodecError, match="middle of a frame"):
        dec.eof()


def test_truncated_payload_then_eof() -> None:
    data = encode(["done", "j", 1])
    dec = FrameDecoder()
    assert dec.feed(data[:-1]) == []
    with pytest.raises(CodecError):
        dec.eof()


def test_truncated_header_then_eof() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"\x00\x00") == []
    with pytest.raises(CodecError):
        dec.eof()


def test_clean_eof() -> None:
    dec = FrameDecoder()
    dec.eof()
    dec.feed(encode(1))
    dec.eof()


def test_empty_frame_rejected() -> None:
    with pytest.raises(CodecError, match="empty"):
        FrameDecoder().feed(HEADER.pack(0))


def test_two_values_in_one_payload_rejected() -> None:
    payload = msgpack.packb(1) + msgpack.packb(2)
    with pytest.raises(CodecError, match="more than one"):
        FrameDecoder().feed(HEADER.pack(len(payload)) + payload)


def test_garbage_payload_rejected() -> None:
    payload = b"\xc1"  # never used in msgpack
    with pytest.raises(CodecError):
        FrameDecoder().feed(HEADER.pack(len(payload)) + payload)


def test_incomplete_msgpack_value_rejected() -> None:
    payload = b"\x92\x01"  # array of 2 with only one element
    with pytest.raises(CodecError):
        FrameDecoder().feed(HEADER.pack(len(payload)) + payload)


def test_non_string_map_key_rejected() -> None:
    payload = msgpack.packb({1: 2})
    with pytest.raises(CodecError):
        FrameDecoder().feed(HEADER.pack(len(payload)) + payload)


def test_deep_nesting_rejected_not_crash() -> None:
    payload = b"\x91" * 100_000 + b"\x00"
    with pytest.raises(CodecError):
        FrameDecoder().feed(HEADER.pack(len(payload)) + payload)


def test_frames_after_complete_one_in_same_feed() -> None:
    dec = FrameDecoder()
    blob = encode("a") + encode("b")[:3]
    assert dec.feed(blob) == ["a"]
    assert dec.feed(encode("b")[3:]) == ["b"]
