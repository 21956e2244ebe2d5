"""The supervisor<->worker pipe codec: length-prefixed msgpack frames.

A frame is a 4-byte big-endian payload length followed by that many bytes of
msgpack. The decoder checks the length against its limit before it buffers
the payload, so a hostile peer cannot make it hold more than one frame's
worth of bytes. Truncation at EOF is an error, as is any payload that is not
exactly one msgpack value.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 4 * 1024 * 1024


class CodecError(Exception):
    """A malformed, oversized or truncated frame."""


def encode(obj: Any, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """One frame for `obj`; CodecError if it cannot be packed or exceeds `max_frame`."""
    try:
        payload = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise CodecError(f"cannot encode frame: {e}") from e
    if len(payload) > max_frame:
        raise CodecError(f"frame of {len(payload)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(payload)) + payload


def _unpack(payload: bytes) -> Any:
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=True)
    except msgpack.ExtraData as e:
        raise CodecError("frame holds more than one msgpack value") from e
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise CodecError(f"malformed frame: {type(e).__name__}: {e}") from e


class FrameDecoder:
    """Feed bytes in, get whole frames out."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being read

    def feed(self, data: bytes) -> list[Any]:
        """Append `data`; return every frame now complete. Raises CodecError on bad input."""
        self._buf += data
        out: list[Any] = []
        buf = self._buf
        pos = 0
        while True:
            if self._need is None:
                if len(buf) - pos < HEADER.size:
                    break
                (n,) = HEADER.unpack_from(buf, pos)
                if n > self.max_frame:
                    raise CodecError(f"frame of {n} bytes exceeds the {self.max_frame}-byte limit")
                if n == 0:
                    raise CodecError("empty frame")
                self._need = n
                pos += HEADER.size
            if len(buf) - pos < self._need:
                break
            payload = bytes(buf[pos : pos + self._need])
            pos += self._need
            self._need = None
            out.append(_unpack(payload))
        if pos:
            del buf[:pos]
        return out

    def eof(self) -> None:
        """The peer closed: CodecError if a frame was cut short."""
        if self._buf or self._need is not None:
            raise CodecError(f"pipe closed in the middle of a frame ({len(self._buf)} bytes pending)")
