"""supervisor/authority.py: lease checks in §8.4 order, budget debits and reservations."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from shared.errors import BudgetExhausted, InvalidRequest, LeaseExpired, PermissionDenied
from supervisor.core.authority import REMAINING_METRIC, Authority

NOW = 1_800_000_000.0


def auth(lease: dict[str, list[str]], expires_at: float | None = None) -> Authority:
    return Authority(lease, expires_at)


# -- validate_op --------------------------------------------------------------------------------------

def test_allowed_op_passes() -> None:
    a = auth({"fs.read": ["/workspace/**"], "cost.budget": ["USD:5"]}, expires_at=NOW + 60)
    a.validate_op("fs.read", "/workspace/a.txt", NOW)


def test_expiry_checked_before_pattern() -> None:
    a = auth({"fs.read": []}, expires_at=NOW)
    with pytest.raises(LeaseExpired):
        a.validate_op("fs.read", "/nowhere", NOW)  # now == expires_at is expired
    with pytest.raises(PermissionDenied):
        a.validate_op("fs.read", "/nowhere", NOW - 0.001)


def test_expiry_checked_before_budget() -> None:
    a = auth({"fs.read": ["/**"], "cost.budget": ["USD:0"]}, expires_at=NOW - 1)
    with pytest.raises(LeaseExpired):
        a.validate_op("fs.read", "/x", NOW)


def test_pattern_checked_before_budget() -> None:
    a = auth({"fs.read": ["/workspace/**"], "cost.budget": ["USD:0"]})
    with pytest.raises(PermissionDenied):
        a.validate_op("fs.read", "/etc/passwd", NOW)
    with pytest.raises(BudgetExhausted):
        a.validate_op("fs.read", "/workspace/x", NOW)


@pytest.mark.parametrize(
    ("lease", "cap", "target"),
    [
        ({}, "fs.read", "/x"),
        ({"fs.read": []}, "fs.read", "/x"),
        ({"fs.read": ["/workspace/**"]}, "fs.write", "/workspace/x"),
        ({"fs.read": ["/workspace/**"]}, "fs.read", "/workspace/../etc/passwd"),
        ({"model.use": ["tier-fast/*"]}, "model.use", "tier-slow/x"),
    ],
)
def test_no_pattern_is_permission_denied(lease: dict[str, list[str]], cap: str, target: str) -> None:
    with pytest.raises(PermissionDenied) as ei:
        auth(lease).validate_op(cap, target, NOW)
    assert ei.value.retryable is False


def test_any_exhausted_currency_blocks_every_op() -> None:
    a = auth({"tool.call": ["*"], "cost.budget": ["USD:1", "EUR:5"]})
    a.validate_op("tool.call", "search", NOW)
    a.debit_metric("cost.api", 1, "USD")
    with pytest.raises(BudgetExhausted) as ei:
        a.validate_op("tool.call", "search", NOW)
    assert "USD" in ei.value.message and ei.value.retryable is False


def test_no_budget_never_exhausted() -> None:
    auth({"tool.call": ["*"]}).validate_op("tool.call", "x", NOW)


# -- debit_metric -------------------------------------------------------------------------------------

def test_first_debit_reports_remaining() -> None:
    a = auth({"cost.budget": ["USD:10"]})
    assert a.debit_metric("cost.tokens", 0.01, "USD") == [(REMAINING_METRIC, 9.99, "USD")]
    assert a.remaining["USD"] == Decimal("9.99")


@pytest.mark.parametrize(
    ("name", "unit"),
    [("latency", "USD"), ("cost.tokens", "EUR"), ("cost.tokens", None), (REMAINING_METRIC, "USD"),
     ("costs", "USD"), ("cost.x", "usd")],
)
def test_non_debiting_metrics(name: str, unit: str | None) -> None:
    a = auth({"cost.budget": ["USD:10"]})
    assert a.debit_metric(name, 3, unit) == []
    assert a.remaining == {"USD": Decimal(10)}


def test_negative_never_credits() -> None:
    a = auth({"cost.budget": ["USD:10"]})
    a.debit_metric("cost.x", 4, "USD")
    assert a.debit_metric("cost.x", -100, "USD") == []
    assert a.remaining["USD"] == Decimal(6)


def test_remaining_emitted_on_every_change_and_at_zero() -> None:
    a = auth({"cost.budget": ["USD:100"]})
    assert a.debit_metric("cost.x", 1, "USD") == [(REMAINING_METRIC, 99.0, "USD")]  # first
    assert a.debit_metric("cost.x", 2, "USD") == [(REMAINING_METRIC, 97.0, "USD")]
    assert a.debit_metric("cost.x", 0.00001, "USD") == []  # below the 0.0001 step
    assert a.debit_metric("cost.x", 0.0001, "USD") == [(REMAINING_METRIC, 96.99989, "USD")]
    assert a.debit_metric("cost.x", 96.99989, "USD") == [(REMAINING_METRIC, 0.0, "USD")]  # <= 0
    assert a.debit_metric("cost.x", 0.01, "USD") == [(REMAINING_METRIC, -0.01, "USD")]  # may go negative
    assert a.debit_metric("cost.x", 0, "USD") == [(REMAINING_METRIC, -0.01, "USD")]  # <= 0: always


def test_float_debits_are_exact_decimals() -> None:
    a = auth({"cost.budget": ["USD:0.3"]})
    for _ in range(3):
        a.debit_metric("cost.x", 0.1, "USD")
    assert a.remaining["USD"] == 0
    assert a.exhausted()


def test_currencies_independent() -> None:
    a = auth({"cost.budget": ["USD:10", "credits:100"]})
    assert a.debit_metric("cost.x", 1, "credits") == [(REMAINING_METRIC, 99.0, "credits")]
    assert a.remaining["USD"] == 10
    assert a.debit_metric("cost.x", 1, "USD") == [(REMAINING_METRIC, 9.0, "USD")]


def test_budget_wire() -> None:
    a = auth({"cost.budget": ["USD:5", "USD:0.25"]})
    a.debit_metric("cost.x", 0.5, "USD")
    assert a.budget_wire() == {"USD": "4.75"}


# -- reserve ------------------------------------------------------------------------------------------

def test_reserve_debits() -> None:
    a = auth({"cost.budget": ["USD:10", "EUR:5"]})
    a.reserve({"USD": 3, "EUR": "1.5"}, NOW)
    assert a.remaining == {"USD": Decimal(7), "EUR": Decimal("3.5")}
    a.reserve({"USD": 7}, NOW)  # exactly to zero is allowed
    assert a.remaining["USD"] == 0


@pytest.mark.parametrize(
    ("amounts", "exc"),
    [
        ({"USD": 1, "EUR": 100}, BudgetExhausted),
        ({"EUR": 100, "USD": 1}, BudgetExhausted),
        ({"USD": 1, "GBP": 1}, BudgetExhausted),
        ({"USD": 1, "EUR": -1}, InvalidRequest),
        ({"USD": 1, "EUR": "abc"}, InvalidRequest),
        ({"USD": 1, "EUR": "NaN"}, InvalidRequest),
        ({"USD": 1, "EUR": "Infinity"}, InvalidRequest),
        ({"USD": 1, "EUR": None}, InvalidRequest),
        ({"USD": 1, "EUR": [1]}, InvalidRequest),
        ({"USD": True}, InvalidRequest),
        ({}, InvalidRequest),
        ([["USD", 1]], InvalidRequest),
        ("USD:1", InvalidRequest),
        (None, InvalidRequest),
    ],
)
def test_reserve_is_atomic(amounts: Any, exc: type[Exception]) -> None:
    a = auth({"cost.budget": ["USD:10", "EUR:5"]})
    before = dict(a.remaining)
    with pytest.raises(exc):
        a.reserve(amounts, NOW)
    assert a.remaining == before


def test_reserve_when_expired() -> None:
    a = auth({"cost.budget": ["USD:10"]}, expires_at=NOW)
    with pytest.raises(LeaseExpired):
        a.reserve({"USD": 1}, NOW)
    assert a.remaining["USD"] == 10


def test_a_refusal_names_the_target_as_asked_never_as_resolved() -> None:
    a = auth({"fs.read": ["/workspace/**"]})
    with pytest.raises(PermissionDenied) as ei:
        a.validate_op("fs.read", "/var/lib/arcp/state.db", NOW, asked="/proc/1/fd/7")
    assert "/proc/1/fd/7" in ei.value.message and "state.db" not in ei.value.message
    with pytest.raises(PermissionDenied) as ei:
        a.validate_op("tool.call", "t" * 5000, NOW)
    assert len(ei.value.message) < 400 and "5000 characters" in ei.value.message
