"""shared/ids.py: ULIDs, prefixed ids, trace ids, timestamps."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from ulid import ULID as ULIDValue

from shared.ids import (
    format_dt, format_ts, new_id, new_resume_token, new_trace_id, new_ulid, now_ts, parse_trace_id,
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
