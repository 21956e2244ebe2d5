"""A job's authority, held by the supervisor: its lease, expiry and budget counters.

Pure: callers pass `now` (wall-clock epoch seconds, for `expires_at`).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from shared.errors import BudgetExhausted, InvalidRequest, LeaseExpired, PermissionDenied
from shared.lease import Lease, initial_budget, lease_allows

REMAINING_METRIC = "cost.budget.remaining"
REPORT_STEP = Decimal("0.0001")


SHOWN_LEN = 256  # characters of a job's target repeated in a refusal


def shown(target: str) -> str:
    """A job's target for an error message: quoted, and cut to SHOWN_LEN characters."""
    if len(target) <= SHOWN_LEN:
        return repr(target)
    return repr(target[:SHOWN_LEN]) + f"... ({len(target)} characters)"


class Authority:
    def __init__(self, lease: Lease, expires_at: float | None) -> None:
        self.lease = lease
        self.expires_at = expires_at
        self.initial = initial_budget(lease)
        self.remaining = dict(self.initial)
        self._last_reported: dict[str, Decimal] = {}

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def exhausted(self) -> bool:
        return any(v <= 0 for v in self.remaining.values())

    def validate_op(self, capability: str, target: str, now: float, *, asked: str | None = None) -> None:
        """protocol.md §8.4: expiry, then the pattern, then every budget counter.

        `target` is what is matched (for fs.*, the resolved path); a refusal names `asked`,
        the target as the job sent it, never what it resolved to.
        """
        if self.expired(now):
            raise LeaseExpired("the job's lease has expired")
        if not lease_allows(self.lease, capability, target):
            raise PermissionDenied(f"lease does not grant {capability[:64]} on {shown(target if asked is None else asked)}")
        if self.initial and self.exhausted():
            spent = ", ".join(f"{c} {v}" for c, v in self.remaining.items() if v <= 0)
            raise BudgetExhausted(f"budget exhausted ({spent} remaining)")

    def debit_metric(self, name: str, value: float, unit: str | None) -> list[tuple[str, float, str]]:
        """Apply a `cost.*` metric; return the `cost.budget.remaining` metrics to emit after it."""
        if not name.startswith("cost.") or name == REMAINING_METRIC or unit not in self.remaining:
            return []
        if value < 0:
            return []  # a cost never credits
        cur = unit
        self.remaining[cur] -= Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        now_left = self.remaining[cur]
        last = self._last_reported.get(cur)
        # The Python runtime's rule (every change of at least 0.0001), not Go's 5 % steps:
        # a client then always sees the counter's latest value after a debit.
        if last is None or now_left <= 0 or abs(last - now_left) >= REPORT_STEP:
            self._last_reported[cur] = now_left
            return [(REMAINING_METRIC, float(now_left), cur)]
        return []

    def reserve(self, amounts: Any, now: float) -> None:
        """Check and debit atomically, or raise without touching any counter."""
        if self.expired(now):
            raise LeaseExpired("the job's lease has expired")
        if not isinstance(amounts, dict) or not amounts:
            raise InvalidRequest("reserve_budget takes a non-empty {currency: amount} mapping")
        parsed: dict[str, Decimal] = {}
        for cur, amt in amounts.items():
            try:
                d = Decimal(str(amt))
            except (InvalidOperation, ValueError) as e:
                raise InvalidRequest(f"reserve_budget amount {amt!r} for {cur!r} is not a number") from e
            if not d.is_finite() or d < 0:
                raise InvalidRequest(f"reserve_budget amount for {cur!r} must be a finite number >= 0")
            parsed[str(cur)] = d
        for cur, d in parsed.items():
            if cur not in self.remaining:
                raise BudgetExhausted(f"the lease has no budget in {cur}")
            if self.remaining[cur] - d < 0:
                raise BudgetExhausted(
                    f"reserving {cur} {d} exceeds the remaining budget of {cur} {self.remaining[cur]}"
                )
        for cur, d in parsed.items():
            self.remaining[cur] -= d

    def budget_wire(self) -> dict[str, str]:
        return {cur: str(v) for cur, v in self.remaining.items()}
