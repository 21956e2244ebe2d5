"""shared/errors.py: one subclass per code; to_wire/from_wire."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from shared import errors
from shared.errors import BY_CODE, CODES, RETRYABLE_DEFAULTS, ARCPError, error, from_wire

EXPECTED_CODES = {
    "PERMISSION_DENIED", "LEASE_SUBSET_VIOLATION", "JOB_NOT_FOUND", "DUPLICATE_KEY",
    "AGENT_NOT_AVAILABLE", "AGENT_VERSION_NOT_AVAILABLE", "CANCELLED", "TIMEOUT",
    "RESUME_WINDOW_EXPIRED", "HEARTBEAT_LOST", "LEASE_EXPIRED", "BUDGET_EXHAUSTED",
    "INVALID_REQUEST", "UNAUTHENTICATED", "INTERNAL_ERROR",
}


def test_code_set() -> None:
    assert CODES == EXPECTED_CODES
    assert set(BY_CODE) == EXPECTED_CODES


@pytest.mark.parametrize("code", sorted(EXPECTED_CODES))
def test_every_code_has_subclass_with_class_attribute(code: str) -> None:
    cls = BY_CODE[code]
    assert issubclass(cls, ARCPError)
    assert cls.code == code  # class attribute, no instance needed
    name = "".join(p.capitalize() for p in code.split("_"))
    assert getattr(errors, {"Timeout": "Timeout", "InternalError": "InternalError"}.get(name, name)) is cls
    e = cls("msg")
    assert e.code == code and e.message == "msg" and str(e) == "msg"


@pytest.mark.parametrize("code", sorted(EXPECTED_CODES))
def test_retryable_defaults(code: str) -> None:
    expected = code in ("INTERNAL_ERROR", "HEARTBEAT_LOST")
    assert RETRYABLE_DEFAULTS[code] is expected
    assert BY_CODE[code]("m").retryable is expected
    assert BY_CODE[code]("m", retryable=not expected).retryable is (not expected)


@pytest.mark.parametrize("code", sorted(EXPECTED_CODES))
@pytest.mark.parametrize("details", [None, {}, {"why": "x", "n": [1, 2]}])
@pytest.mark.parametrize("retryable", [None, True, False])
def test_wire_round_trip(code: str, details: dict[str, Any] | None, retryable: bool | None) -> None:
    e = error(code, "boom", retryable=retryable, details=details)
    wire = e.to_wire()
    back = from_wire(wire)
    assert type(back) is type(e)
    assert back.to_wire() == wire
    if details is None:
        assert "details" not in wire


def test_to_wire_shape() -> None:
    assert errors.JobNotFound("no job").to_wire() == {
        "code": "JOB_NOT_FOUND", "message": "no job", "retryable": False}


def test_pickle_round_trip() -> None:
    e = errors.PermissionDenied("nope", details={"a": 1})
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is errors.PermissionDenied and back.to_wire() == e.to_wire()


def test_base_rejects_unknown_code() -> None:
    with pytest.raises(ValueError):
        ARCPError("NOT_A_CODE", "x")


@pytest.mark.parametrize(
    "obj",
    [
        None, [], "INTERNAL_ERROR", 1,
        {},
        {"message": "x"},
        {"code": "NOPE", "message": "x"},
        {"code": None, "message": "x"},
        {"code": 1, "message": "x"},
        {"code": "TIMEOUT"},
        {"code": "TIMEOUT", "message": 3},
        {"code": "TIMEOUT", "message": "x", "retryable": "yes"},
        {"code": "TIMEOUT", "message": "x", "retryable": 1},
        {"code": "TIMEOUT", "message": "x", "details": [1]},
        {"code": "TIMEOUT", "message": "x", "details": "d"},
    ],
)
def test_from_wire_rejects_malformed(obj: Any) -> None:
    with pytest.raises(ValueError):
        from_wire(obj)


@pytest.mark.parametrize("code", [[], {}, ["TIMEOUT"]])
def test_from_wire_rejects_unhashable_code(code: Any) -> None:
    with pytest.raises(ValueError):
        from_wire({"code": code, "message": "x"})
