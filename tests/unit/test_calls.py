"""The calls a worker makes for its job: one table bounds them and answers them."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from shared import pipe_messages as pm
from shared.errors import InvalidRequest, PermissionDenied
from shared.pipe_codec import FrameDecoder
from supervisor.jobs import calls
from supervisor.jobs.runner import JobRunner
from supervisor.jobs.worker_rpc import Call, WorkerFrames, WorkerProtocolError


_REQUEST = SimpleNamespace(limits=SimpleNamespace(max_runtime=60), max_runtime_sec=None, expires_at=None)

def test_the_table_answers_every_call_of_the_pipe_protocol() -> None:
    assert set(calls.CALLS) == pm.CALL_OPS
    assert calls.CALL_ARITY == {"budget": 0, "reserve_budget": 1, "validate_lease_op": 2, "tool_call": 2,
                                "delegate": 3, "rotate_credential": 2}


@pytest.mark.parametrize("op", ["nope", "x" * 100, "Budget", ""])
def test_an_unknown_op_is_refused_as_before(op: str) -> None:
    with pytest.raises(InvalidRequest) as ei:
        calls.check_call(op, [])
    assert ei.value.message == f"unknown call {op[:40]!r}"
    with pytest.raises(InvalidRequest) as ei:
        calls.answer(_Host(), op, [])
    assert ei.value.message == f"unknown call {op[:40]!r}"
    # and on the pipe, a call frame naming it is a protocol error, as before
    with pytest.raises(WorkerProtocolError, match="unknown call"):
        WorkerFrames("job_1", 1 << 20, 1 << 16).actions([pm.CALL, "job_1", 1, op, []])


class _Authority:
    def __init__(self) -> None:
        self.validated: list[tuple[str, str]] = []
        self.reserved: list[Any] = []

    def budget_wire(self) -> dict[str, str]:
        return {"USD": "1.00"}

    def validate_op(self, cap: str, target: str, now: float, *, asked: str | None = None) -> None:
        if target == "/denied":
            raise PermissionDenied("no")
        self.validated.append((cap, target))

    def reserve(self, amounts: Any, now: float) -> None:
        self.reserved.append(amounts)


class _Host:
    def __init__(self) -> None:
        self.authority: Any = _Authority()
        self.lease = {"tool.call": ["search.*"]}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.paths: list[tuple[str, str]] = []
        self.rotated: list[tuple[str, str]] = []

    def emit(self, kind: str, body: dict[str, Any]) -> None:
        self.events.append((kind, body))

    async def check_path(self, cap: str, target: str) -> None:
        self.paths.append((cap, target))

    def delegate(self, agent: str, child_input: Any, lease: Any) -> str:
        return f"job_child_of_{agent}"

    async def rotate_credential(self, credential_id: str, value: str) -> None:
        self.rotated.append((credential_id, value))


def test_each_op_is_answered_by_its_entry() -> None:
    host = _Host()
    assert calls.answer(host, "budget", []) == {"USD": "1.00"}
    assert calls.answer(host, "validate_lease_op", ["net.fetch", "https://x/"]) is None
    assert host.authority.validated == [("net.fetch", "https://x/")]
    with pytest.raises(PermissionDenied):
        calls.answer(host, "validate_lease_op", ["net.fetch", "/denied"])
    assert calls.answer(host, "reserve_budget", [{"USD": "0.5"}]) is None and host.authority.reserved
    call_id = calls.answer(host, "tool_call", ["search.web", {"q": 1}])
    assert host.events == [("tool_call", {"tool": "search.web", "args": {"q": 1}, "call_id": call_id})]
    with pytest.raises(PermissionDenied):
        calls.answer(host, "tool_call", ["mail.send", {}])
    assert calls.answer(host, "delegate", ["echo", None, None]) == "job_child_of_echo"
    # answers that wait: given by the runner from a task of its own
    later = calls.answer(host, "validate_lease_op", ["fs.read", "/data/x"])
    assert isinstance(later, calls.Later) and later.name == "path check" and host.paths == []
    asyncio.run(later.answer())
    assert host.paths == [("fs.read", "/data/x")] and host.authority.validated[-1][0] != "fs.read"
    later = calls.answer(host, "rotate_credential", ["cred_1", "v2"])
    assert isinstance(later, calls.Later) and later.name == "credential rotation"
    asyncio.run(later.answer())
    assert host.rotated == [("cred_1", "v2")]


class _Writer:
    def __init__(self) -> None:
        self.frames: list[Any] = []
        self._decoder = FrameDecoder(pm.MAX_PIPE_FRAME)

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.frames += self._decoder.feed(data)


def test_the_runner_replies_to_an_unknown_op_with_the_same_error_as_before() -> None:
    rt = SimpleNamespace(frame_cap=1 << 20, config=SimpleNamespace(max_result_bytes=1 << 20, chunk_size=1 << 16))
    job = SimpleNamespace(id="job_1", request=_REQUEST,
                          owner=SimpleNamespace(), done=False)
    runner = JobRunner(rt, job)  # type: ignore[arg-type]
    writer = _Writer()
    runner._answer(writer, Call(7, "nope", []))  # type: ignore[arg-type]
    assert writer.frames == [[pm.REPLY, 7, False, InvalidRequest("unknown call 'nope'").to_wire()]]
