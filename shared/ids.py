"""Identifiers (ULIDs, prefixed ULIDs, trace ids) and RFC 3339 timestamps."""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import weakref
from datetime import UTC, datetime

ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
TRACE_RE = re.compile(r"^[0-9a-f]{32}$")
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> 2 characters
_RANDOM_BYTES = 10  # a millisecond's random part: 40 bits shown as they are, then the counter's start
_RANDOM_BUFFER = 409 * _RANDOM_BYTES  # 4 KiB of os.urandom: 409 milliseconds' worth per call


class MonotonicULID:
    """ULIDs at a few hundred nanoseconds each: the 48-bit millisecond time, then 80
    bits that start random each millisecond and count up within it (the ULID spec's
    monotonic mode). Every envelope carries a fresh id, so this sits on the hot path;
    python-ulid's `ULID()` costs about ten times as much per id.

    The random bits come from os.urandom 4 KiB at a time. A forked child starts afresh
    (no bytes, no millisecond): it never repeats its parent's ids.
    """

    def __init__(self) -> None:
        self._forget()
        me = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_in_child(me))

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._ms = -1
        self._head = ""
        self._counter = 0
        self._random = b""
        self._used = 0  # bytes of `_random` taken

    def __call__(self) -> str:
        ms = time.time_ns() // 1_000_000
        p = _PAIRS
        with self._lock:
            if ms != self._ms:
                self._ms = ms
                at = self._used
                if at + _RANDOM_BYTES > len(self._random):
                    self._random, at = os.urandom(_RANDOM_BUFFER), 0
                self._used = at + _RANDOM_BYTES
                rnd = int.from_bytes(self._random[at:at + _RANDOM_BYTES], "big")
                self._head = (p[(ms >> 40) & 1023] + p[(ms >> 30) & 1023] + p[(ms >> 20) & 1023]
                              + p[(ms >> 10) & 1023] + p[ms & 1023] + p[(rnd >> 70) & 1023]
                              + p[(rnd >> 60) & 1023] + p[(rnd >> 50) & 1023] + p[(rnd >> 40) & 1023])
                self._counter = (rnd & ((1 << 39) - 1))  # room to count up within the ms
            else:
                self._counter += 1
            c = self._counter
        return self._head + p[(c >> 30) & 1023] + p[(c >> 20) & 1023] + p[(c >> 10) & 1023] + p[c & 1023]


def _forget_in_child(ref: weakref.ref[MonotonicULID]) -> None:
    gen = ref()
    if gen is not None:
        gen._forget()


new_ulid = MonotonicULID()
"""26 characters of uppercase Crockford base32, time-ordered."""


def new_id(prefix: str) -> str:
    """`prefix_ULID`, e.g. `job_01JZ...`."""
    return f"{prefix}_{new_ulid()}"


def new_trace_id() -> str:
    """A random W3C trace id: 32 lowercase hex digits, never all zeros."""
    while True:
        t = secrets.token_hex(16)
        if t != "0" * 32:
            return t


def new_resume_token() -> str:
    """An opaque resume token with 160 bits of randomness."""
    return "rtk_" + secrets.token_hex(20)


def parse_trace_id(value: object) -> str:
    """Normalise a client's trace id (32 hex, or a traceparent); ValueError if neither."""
    if not isinstance(value, str):
        raise ValueError("trace_id must be a string")
    low = value.strip().lower()
    m = TRACEPARENT_RE.match(low)
    if m:
        low = m.group(1)
    if not TRACE_RE.match(low) or low == "0" * 32:
        raise ValueError("trace_id must be 32 hex digits (not all zero) or a W3C traceparent")
    return low


def format_ts(epoch: float) -> str:
    """`YYYY-MM-DDTHH:MM:SS.ffffffZ` for a Unix time (rounded to the microsecond)."""
    secs, micros = divmod(round(epoch * 1_000_000), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{micros:06d}Z"


_second_cache: tuple[int, str] = (-1, "")


def now_ts() -> str:
    """The current time as `format_ts` gives it; the date part is cached per second."""
    global _second_cache
    secs, micros = divmod(time.time_ns() // 1000, 1_000_000)
    cached = _second_cache  # one read: the pair is replaced whole, never torn
    if cached[0] != secs:
        cached = _second_cache = (secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)))
    return f"{cached[1]}.{micros:06d}Z"


def parse_ts(value: object) -> datetime:
    """Parse an RFC 3339 timestamp that carries an explicit offset; ValueError otherwise."""
    if not isinstance(value, str):
        raise ValueError("timestamp must be a string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no UTC offset")
    return dt.astimezone(UTC)


def format_dt(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
