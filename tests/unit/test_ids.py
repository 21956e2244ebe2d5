"""shared/ids.py: ULIDs, prefixed ids, trace ids, timestamps."""

from __future__ import annotations

import os
import random
import re
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from ulid import ULID as ULIDValue

from shared import ids
from shared.ids import (
    MonotonicULID, format_dt, format_ts, new_id, new_resume_token, new_trace_id, new_ulid, now_ts, parse_trace_id,
    parse_ts,
)

ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")


def test_new_ulid_format_and_unique() -> None:
    ids = [new_ulid() for _ in range(200)]
    assert all(ULID.match(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_new_ulid_monotonic_and_timed() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_ulid() for _ in range(5000)]
    after = time.time_ns() // 1_000_000
    assert ids == sorted(ids) and len(set(ids)) == len(ids)  # strictly increasing
    for i in (ids[0], ids[-1]):
        assert before <= ULIDValue.from_str(i).milliseconds <= after


def test_new_ulid_thread_safe_unique() -> None:
    out: list[str] = []

    def work() -> None:
        out.extend(new_ulid() for _ in range(2000))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(out)) == len(out) == 8000
    assert all(ULID.match(i) for i in out)


def _reference_ulids(times_ns: list[int], random_bytes: bytes) -> list[str]:
    """The ids as python-ulid's timestamp encoding and one 10-byte draw per millisecond make them
    (the millisecond given as an int: as seconds, a float, it may come back one less, 1023 ms
    as 1.023 s as 1022 ms)."""
    def encode(value: int, chars: int) -> str:
        return "".join("0123456789ABCDEFGHJKMNPQRSTVWXYZ"[(value >> 5 * i) & 31] for i in reversed(range(chars)))

    out, last_ms, head, counter, used = [], -1, "", 0, 0
    for ns in times_ns:
        ms = ns // 1_000_000
        if ms != last_ms:
            last_ms = ms
            rnd = int.from_bytes(random_bytes[used:used + 10], "big")
            used += 10
            head = str(ULIDValue.from_timestamp(ms))[:10] + encode(rnd >> 40, 8)
            counter = rnd & ((1 << 39) - 1)
        else:
            counter += 1
        out.append(head + encode(counter, 8))
    return out


def test_new_ulid_is_the_reference_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over many milliseconds (the random buffer refilled several times), with runs of ids
    within one millisecond, and at the ends of the 48-bit range: the same ids as python-ulid's
    timestamp and one os.urandom(10) per millisecond give."""
    rng = random.Random(20260101)
    times: list[int] = []
    for ms in [0, 1, 31, 32, 1023, 1024, (1 << 48) - 1, (1 << 47), 1_767_225_599_999, 1_767_225_600_000]:
        times += [ms * 1_000_000 + k for k in (0, 1, 999_999)]  # three ids within each of these milliseconds
    ms = 1_700_000_000_000
    for _ in range(3000):
        ms += rng.choice([1, 1, 2, 7, 1000, 86_400_000])
        times += sorted(ms * 1_000_000 + rng.randrange(1_000_000) for _ in range(rng.choice([1, 1, 2, 5, 40])))
    blob = rng.randbytes(10 * len(times))
    drawn: list[int] = []

    def urandom(n: int) -> bytes:
        at = sum(drawn)
        drawn.append(n)
        return blob[at:at + n] + bytes(max(0, at + n - len(blob)))

    clock = iter(times)
    gen = MonotonicULID()
    monkeypatch.setattr(ids, "os", SimpleNamespace(urandom=urandom))
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: next(clock)))
    got = [gen() for _ in times]
    assert got == _reference_ulids(times, blob)
    distinct_ms = len({t // 1_000_000 for t in times})
    assert len(drawn) == -(-distinct_ms // 409) and set(drawn) == {4090}  # 4 KiB per call, not 10 bytes per ms
    assert all(ULIDValue.from_str(i).milliseconds == t // 1_000_000 for i, t in zip(got[::97], times[::97]))
    # for these years, what the float seconds gave as well (the encoding before this one)
    for t in times[30::13]:
        assert str(ULIDValue.from_timestamp(t // 1_000_000 / 1000))[:10] == got[times.index(t)][:10]


def test_a_forked_child_draws_its_own_random_bits() -> None:
    gen = MonotonicULID()
    gen()  # the buffer filled: the child must not take its next bytes from it
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            gen._ms = -1
            os.write(w, gen().encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child = f.read().decode()
    os.waitpid(pid, 0)
    gen._ms = -1
    parent = gen()
    assert ULID.match(child) and child[10:18] != parent[10:18]


@pytest.mark.parametrize("prefix", ["job", "sess", "res"])
def test_new_id_prefixed(prefix: str) -> None:
    assert re.match(rf"^{prefix}_[0-9A-HJKMNP-TV-Z]{{26}}$", new_id(prefix))


def test_trace_ids() -> None:
    for _ in range(200):
        t = new_trace_id()
        assert re.match(r"^[0-9a-f]{32}$", t) and t != "0" * 32


def test_resume_token() -> None:
    assert re.match(r"^rtk_[0-9a-f]{40}$", new_resume_token())


def test_parse_trace_id_accepts_hex_and_lowercases() -> None:
    assert parse_trace_id("4bf92f3577b34da6a3ce929d0e0e4736") == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parse_trace_id("4BF92F3577B34DA6A3CE929D0E0E4736") == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_parse_trace_id_accepts_traceparent() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert parse_trace_id(tp) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parse_trace_id(tp.upper()) == "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    "value",
    [
        "0" * 32, "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "", "xyz", "4bf92f3577b34da6a3ce929d0e0e473",
        "4bf92f3577b34da6a3ce929d0e0e47366", "g" * 32, "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", None, 123, b"4bf92f3577b34da6a3ce929d0e0e4736",
    ],
)
def test_parse_trace_id_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_trace_id(value)


@pytest.mark.parametrize("epoch", [0.0, 1.5, 1_700_000_000.123456, 1_800_000_000.999999, 253402300799.0])
def test_format_ts_parses_and_ends_with_z(epoch: float) -> None:
    s = format_ts(epoch)
    assert s.endswith("Z")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$", s)
    dt = datetime.fromisoformat(s)
    assert abs(dt.timestamp() - epoch) < 1e-5


def test_now_ts_parses() -> None:
    assert datetime.fromisoformat(now_ts()).tzinfo is not None


def test_format_dt_whole_microseconds() -> None:
    assert format_dt(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000000Z"


def test_format_dt_keeps_microseconds() -> None:
    dt = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert format_dt(dt) == "2026-01-02T03:04:05.678000Z"


def test_format_ts_negative_fraction() -> None:
    s = format_ts(-0.5)
    assert datetime.fromisoformat(s).timestamp() == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05.5z", datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)),
        ("2026-01-02T03:04:05+00:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T05:04:05+02:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_parse_ts_accepts_offsets(text: str, expected: datetime) -> None:
    got = parse_ts(text)
    assert got == expected and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["2026-01-02T03:04:05", "2026-01-02", "not a date", "", 5, None])
def test_parse_ts_rejects(text: object) -> None:
    with pytest.raises(ValueError):
        parse_ts(text)


def test_parse_ts_inverts_format_ts() -> None:
    assert parse_ts(format_ts(1_700_000_000.25)).timestamp() == 1_700_000_000.25
