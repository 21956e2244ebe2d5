"""The calls a worker makes for its job (pipe frames ["call", job, id, op, args]): one table.

Each op has one entry: how many arguments it takes, the bounds its arguments are held to
before any work is done for it (a call that asks too much is answered INVALID_REQUEST,
naming the argument and its bound; the job goes on), and its answer. Most answers are
given at once, in the pump; an answer that waits (a path resolved on a thread, a
credential rotated by the provisioner) is a `Later`, which the job's runner awaits in a
task of its own and answers when done. An op not in the table is unknown: the frame is
refused (worker_rpc.py), and `check_call` refuses it too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from shared.errors import InvalidRequest, PermissionDenied
from shared.ids import new_id
from shared.lease import (
    MAX_CAPABILITY_LEN, MAX_PATTERN_LEN, PATH_CAPABILITIES, LeaseError, bound_error, lease_allows,
    validate_lease_request,
)
from supervisor.core.authority import Authority, shown

MAX_NAME_LEN = MAX_PATTERN_LEN  # tool and agent names: as long as a lease pattern naming them may be
MAX_CREDENTIAL_ID_LEN = 256
MAX_CREDENTIAL_LEN = 16384
MAX_BUDGET_ENTRIES = 64
MAX_CURRENCY_LEN = 64
MAX_AMOUNT_LEN = 64


class CallHost(Protocol):
    """What answering a call needs of the job's runner."""

    @property
    def authority(self) -> Authority: ...

    @property
    def lease(self) -> dict[str, list[str]]: ...

    def emit(self, kind: str, body: dict[str, Any]) -> None: ...

    async def check_path(self, cap: str, target: str) -> None: ...

    def delegate(self, agent: str, child_input: Any, lease: Any) -> str: ...

    async def rotate_credential(self, credential_id: str, value: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Later:
    """An answer that waits: `answer()` gives it; `name` names the kind of call in refusals
    ("more than N path checks ... are waiting") and faults ("the path check failed")."""

    answer: Callable[[], Coroutine[Any, Any, Any]]
    name: str


@dataclass(frozen=True, slots=True)
class CallSpec:
    arity: int
    answer: Callable[[CallHost, list[Any]], Any]  # the reply's value, or a Later
    bound: Callable[[str, list[Any]], None] | None = None  # InvalidRequest for an argument out of bounds


# -- bounds -------------------------------------------------------------------------------------

def _bounded(v: Any, op: str, what: str, limit: int, *, empty: bool = True) -> str:
    if not isinstance(v, str):
        raise InvalidRequest(f"{op}: {what} is not a string")
    if not v and not empty:
        raise InvalidRequest(f"{op}: {what} is empty")
    if len(v) > limit or len(v.encode("utf-8", "surrogatepass")) > limit:
        raise InvalidRequest(f"{op}: {what} is longer than {limit} bytes, the most accepted")
    return v


def _bound_lease_op(op: str, args: list[Any]) -> None:
    """Paths follow the kernel (PATH_MAX 4096 bytes in all, NUL included; NAME_MAX 255 bytes
    per segment), see shared.lease.bound_error."""
    cap = _bounded(args[0], op, "capability", MAX_CAPABILITY_LEN, empty=False)
    if not isinstance(args[1], str):
        raise InvalidRequest(f"{op}: target is not a string")
    why = bound_error(cap, args[1])
    if why is not None:
        raise InvalidRequest(f"{op}: the {cap[:64]} target {why}")


def _bound_tool_call(op: str, args: list[Any]) -> None:
    _bounded(args[0], op, "tool name", MAX_NAME_LEN, empty=False)


def _bound_delegate(op: str, args: list[Any]) -> None:
    _bounded(args[0], op, "agent", MAX_NAME_LEN, empty=False)
    try:
        validate_lease_request(args[2])  # linear in its size, bounded per pattern
    except LeaseError as e:
        raise InvalidRequest(f"{op}: {e}") from None


def _bound_rotation(op: str, args: list[Any]) -> None:
    _bounded(args[0], op, "credential id", MAX_CREDENTIAL_ID_LEN, empty=False)
    _bounded(args[1], op, "credential value", MAX_CREDENTIAL_LEN)


def _bound_reservation(op: str, args: list[Any]) -> None:
    amounts = args[0]
    if not isinstance(amounts, dict):
        raise InvalidRequest(f"{op} takes a {{currency: amount}} mapping")
    if len(amounts) > MAX_BUDGET_ENTRIES:
        raise InvalidRequest(f"{op}: more than {MAX_BUDGET_ENTRIES} currencies")
    for cur, amount in amounts.items():
        _bounded(cur, op, "currency", MAX_CURRENCY_LEN, empty=False)
        if isinstance(amount, str):
            _bounded(amount, op, f"amount for {cur!r}", MAX_AMOUNT_LEN)
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise InvalidRequest(f"{op}: amount for {cur!r} is not a number or a decimal string")
        elif isinstance(amount, int) and amount.bit_length() > 64:
            raise InvalidRequest(f"{op}: amount for {cur!r} is wider than 64 bits")


# -- answers -----------------------------------------------------------------------------------

def _budget(host: CallHost, args: list[Any]) -> Any:
    return host.authority.budget_wire()


def _validate_lease_op(host: CallHost, args: list[Any]) -> Any:
    cap, target = args
    if cap in PATH_CAPABILITIES:  # resolved off the loop, one at a time per job, answered later
        return Later(lambda: host.check_path(cap, target), "path check")
    if not isinstance(cap, str) or not isinstance(target, str):
        raise InvalidRequest("validate_lease_op takes two strings")
    host.authority.validate_op(cap, target, time.time())
    return None


def _reserve_budget(host: CallHost, args: list[Any]) -> Any:
    (amounts,) = args
    host.authority.reserve(amounts, time.time())
    return None


def _tool_call(host: CallHost, args: list[Any]) -> Any:
    tool, tool_args = args
    if not isinstance(tool, str) or not tool:
        raise InvalidRequest("tool name must be a non-empty string")
    if "tool.call" in host.lease and not lease_allows(host.lease, "tool.call", tool):
        raise PermissionDenied(f"lease does not grant tool.call on {shown(tool)}")
    call_id = new_id("c")
    host.emit("tool_call", {"tool": tool, "args": tool_args, "call_id": call_id})
    return call_id


def _delegate(host: CallHost, args: list[Any]) -> Any:
    agent, child_input, lease = args
    return host.delegate(agent, child_input, lease)


def _rotate_credential(host: CallHost, args: list[Any]) -> Any:
    cred_id, value = args
    if not isinstance(cred_id, str) or not isinstance(value, str):
        raise InvalidRequest("rotate_credential takes a credential id and a new value (strings)")
    return Later(lambda: host.rotate_credential(cred_id, value), "credential rotation")


CALLS: dict[str, CallSpec] = {
    "budget": CallSpec(0, _budget),
    "reserve_budget": CallSpec(1, _reserve_budget, _bound_reservation),
    "validate_lease_op": CallSpec(2, _validate_lease_op, _bound_lease_op),
    "tool_call": CallSpec(2, _tool_call, _bound_tool_call),
    "delegate": CallSpec(3, _delegate, _bound_delegate),
    "rotate_credential": CallSpec(2, _rotate_credential, _bound_rotation),
}
CALL_ARITY = {op: spec.arity for op, spec in CALLS.items()}


def check_call(op: str, args: list[Any]) -> CallSpec:
    """Bound every argument of a worker's call before any work is done for it; its entry.

    InvalidRequest names the argument and the bound; the message never repeats an
    argument longer than a few dozen characters.
    """
    spec = CALLS.get(op)
    if spec is None:
        raise InvalidRequest(f"unknown call {op[:40]!r}")
    if len(args) != spec.arity:
        raise InvalidRequest(f"{op} takes {spec.arity} arguments, got {len(args)}")
    if spec.bound is not None:
        spec.bound(op, args)
    return spec


def answer(host: CallHost, op: str, args: list[Any]) -> Any:
    """The value of the reply to a call (a `Later` for one that waits); ARCPError for an error
    reply, TypeError or ValueError for arguments of the wrong shape."""
    return check_call(op, args).answer(host, args)
