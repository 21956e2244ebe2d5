"""Payloads and envelopes the server sends, in each client flavour (protocol.md §10.2).

Pure builders: no I/O, no clocks except through the values passed in.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from shared.envelope import frame
from shared.errors import ARCPError
from shared.ids import new_ulid

GO, PY = "go", "py"
USAGE_KEY = "x-vendor.arcp-supervisor.usage"  # also in the envelope's extensions (supervisor/usage.py)


def session_error(err: ARCPError, *, session_id: str | None, request_id: str | None = None,
                  job_id: str | None = None) -> dict[str, Any]:
    payload = err.to_wire()
    if request_id is not None:
        payload["request_id"] = request_id
    if job_id is not None:
        payload["job_id"] = job_id
    return frame("session.error", new_ulid(), payload, session_id=session_id, job_id=job_id)


def budget_wire(budget: dict[str, Decimal], flavour: str) -> dict[str, Any]:
    """Counters as each client parses them: `"USD:5.00"` (Py) or numbers (Go)."""
    if flavour == GO:
        return {cur: float(v) for cur, v in budget.items()}
    return {cur: f"{cur}:{v}" for cur, v in budget.items()}


def result_payload(value: Any, *, completed_at: str, flavour: str, result_id: str | None = None,
                   result_size: int | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """`job.result`; `usage` (the job's, supervisor/usage.py) as a payload field that every
    client keeps: the Python client shows unknown payload fields to its user."""
    p: dict[str, Any] = {"final_status": "success"}
    if result_id is not None:
        p["result_id"] = result_id
        p["result_size"] = result_size or 0
    elif value is not None:
        p["result"] = value
        if flavour == GO:
            p["output"] = value
    p["completed_at"] = completed_at
    if usage is not None:
        p[USAGE_KEY] = usage
    return p


def error_payload(err: dict[str, Any], *, status: str, completed_at: str, flavour: str,
                  usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """`job.error`: final_status is always "error" for Py clients (§6.5)."""
    final = status if flavour == GO and status in ("cancelled", "timed_out") else "error"
    p = {
        "final_status": final,
        "code": err["code"],
        "message": err.get("message") or err["code"],
        "retryable": bool(err.get("retryable", False)),
        "completed_at": completed_at,
    }
    if err.get("details") is not None:
        p["details"] = err["details"]
    if usage is not None:
        p[USAGE_KEY] = usage
    return p
