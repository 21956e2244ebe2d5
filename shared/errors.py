"""The ARCP error hierarchy: one base class, one subclass per wire code.

    ARCPError(code, message, *, retryable=None, details=None)
     +-- PermissionDenied          PERMISSION_DENIED
     +-- LeaseSubsetViolation      LEASE_SUBSET_VIOLATION
     +-- JobNotFound               JOB_NOT_FOUND
     +-- DuplicateKey              DUPLICATE_KEY
     +-- AgentNotAvailable         AGENT_NOT_AVAILABLE
     +-- AgentVersionNotAvailable  AGENT_VERSION_NOT_AVAILABLE
     +-- Cancelled                 CANCELLED
     +-- Timeout                   TIMEOUT
     +-- ResumeWindowExpired       RESUME_WINDOW_EXPIRED
     +-- HeartbeatLost             HEARTBEAT_LOST
     +-- LeaseExpired              LEASE_EXPIRED
     +-- BudgetExhausted           BUDGET_EXHAUSTED
     +-- InvalidRequest            INVALID_REQUEST
     +-- Unauthenticated           UNAUTHENTICATED
     +-- InternalError             INTERNAL_ERROR

Raise inside; translate once at each edge (`to_wire` / `from_wire`).
"""

from __future__ import annotations

from typing import Any

# code -> default `retryable` (protocol.md §9.1; HEARTBEAT_LOST follows Go).
RETRYABLE_DEFAULTS: dict[str, bool] = {
    "PERMISSION_DENIED": False,
    "LEASE_SUBSET_VIOLATION": False,
    "JOB_NOT_FOUND": False,
    "DUPLICATE_KEY": False,
    "AGENT_NOT_AVAILABLE": False,
    "AGENT_VERSION_NOT_AVAILABLE": False,
    "CANCELLED": False,
    "TIMEOUT": False,
    "RESUME_WINDOW_EXPIRED": False,
    "HEARTBEAT_LOST": True,
    "LEASE_EXPIRED": False,
    "BUDGET_EXHAUSTED": False,
    "INVALID_REQUEST": False,
    "UNAUTHENTICATED": False,
    "INTERNAL_ERROR": True,
}
CODES = frozenset(RETRYABLE_DEFAULTS)


class ARCPError(Exception):
    """An error with an ARCP wire code, a message, a retryable flag and details."""

    code: str = "INTERNAL_ERROR"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if code not in CODES:
            raise ValueError(f"unknown ARCP error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = RETRYABLE_DEFAULTS[code] if retryable is None else bool(retryable)
        self.details = details

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (from_wire, (self.to_wire(),))

    def to_wire(self) -> dict[str, Any]:
        """`{code, message, retryable, details?}` as carried by session.error / job.error."""
        out: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.details is not None:
            out["details"] = self.details
        return out


class _CodedError(ARCPError):
    def __init__(self, message: str, *, retryable: bool | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(type(self).code, message, retryable=retryable, details=details)


class PermissionDenied(_CodedError):
    code = "PERMISSION_DENIED"


class LeaseSubsetViolation(_CodedError):
    code = "LEASE_SUBSET_VIOLATION"


class JobNotFound(_CodedError):
    code = "JOB_NOT_FOUND"


class DuplicateKey(_CodedError):
    code = "DUPLICATE_KEY"


class AgentNotAvailable(_CodedError):
    code = "AGENT_NOT_AVAILABLE"


class AgentVersionNotAvailable(_CodedError):
    code = "AGENT_VERSION_NOT_AVAILABLE"


class Cancelled(_CodedError):
    code = "CANCELLED"


class Timeout(_CodedError):
    code = "TIMEOUT"


class ResumeWindowExpired(_CodedError):
    code = "RESUME_WINDOW_EXPIRED"


class HeartbeatLost(_CodedError):
    code = "HEARTBEAT_LOST"


class LeaseExpired(_CodedError):
    code = "LEASE_EXPIRED"


class BudgetExhausted(_CodedError):
    code = "BUDGET_EXHAUSTED"


class InvalidRequest(_CodedError):
    code = "INVALID_REQUEST"


class Unauthenticated(_CodedError):
    code = "UNAUTHENTICATED"


class InternalError(_CodedError):
    code = "INTERNAL_ERROR"


BY_CODE: dict[str, type[_CodedError]] = {
    cls.code: cls
    for cls in (
        PermissionDenied, LeaseSubsetViolation, JobNotFound, DuplicateKey, AgentNotAvailable,
        AgentVersionNotAvailable, Cancelled, Timeout, ResumeWindowExpired, HeartbeatLost,
        LeaseExpired, BudgetExhausted, InvalidRequest, Unauthenticated, InternalError,
    )
}
assert set(BY_CODE) == CODES


def error(code: str, message: str, *, retryable: bool | None = None,
          details: dict[str, Any] | None = None) -> ARCPError:
    """Build the subclass for `code`."""
    return BY_CODE[code](message, retryable=retryable, details=details)


def from_wire(obj: Any) -> ARCPError:
    """Rebuild an error from `{code, message, retryable?, details?}`; raises ValueError if malformed."""
    if not isinstance(obj, dict):
        raise ValueError("error is not an object")
    code, message = obj.get("code"), obj.get("message")
    if not isinstance(code, str) or code not in CODES:
        raise ValueError(f"unknown error code {str(code)[:40]!r}")
    if not isinstance(message, str):
        raise ValueError("error message is not a string")
    retryable = obj.get("retryable")
    if retryable is not None and not isinstance(retryable, bool):
        raise ValueError("error retryable is not a boolean")
    details = obj.get("details")
    if details is not None and not isinstance(details, dict):
        raise ValueError("error details is not an object")
    return error(code, message, retryable=retryable, details=details)
