"""supervisor/worker_rpc.py: every worker frame checked and turned into actions."""

from __future__ import annotations

import base64
import os
import re
from typing import Any

import orjson
import pytest

from shared import pipe_messages as pm
from supervisor.jobs.worker_rpc import Call, Done, Event, Fail, WorkerFrames, WorkerProtocolError

JOB = "job_01ARZ3NDEKTSV4RRFFQ69G5FAV"
OTHER = "job_01BX5ZZKBKACTAV9WEVGEMMVRZ"
MAX_TEXT = 4096


def wf(max_result_bytes: int = 1 << 20, max_chunk_text: int = MAX_TEXT) -> WorkerFrames:
    return WorkerFrames(JOB, max_result_bytes, max_chunk_text)


def ev(op: str, *args: Any) -> list[Any]:
    return ["ev", JOB, op, list(args)]


# -- honest frames ----------------------------------------------------------------------------------

HONEST_EVENTS: list[tuple[list[Any], str, dict[str, Any]]] = [
    (ev("log", "info", "m", None), "log", {"level": "info", "message": "m"}),
    (ev("log", "debug", "", {}), "log", {"level": "debug", "message": ""}),
    (ev("log", "warn", "w", {"k": [1, "v"]}), "log",
     {"level": "warn", "message": "w", "fields": {"k": [1, "v"]}, "attributes": {"k": [1, "v"]}}),
    (ev("log", "error", "e", None), "log", {"level": "error", "message": "e"}),
    (ev("thought", "hmm"), "thought", {"text": "hmm"}),
    (ev("status", "running", None), "status", {"phase": "running"}),
    (ev("status", "fetching", "page 2"), "status", {"phase": "fetching", "message": "page 2"}),
    (ev("metric", "latency", 1.5, None, None), "metric", {"name": "latency", "value": 1.5}),
    (ev("metric", "cost.tokens", 3, "USD", {"model": "m"}), "metric",
     {"name": "cost.tokens", "value": 3, "unit": "USD", "dimensions": {"model": "m"}}),
    (ev("progress", 0, None, None, None), "progress", {"current": 0}),
    (ev("progress", 3, 10, "files", "copying"), "progress",
     {"current": 3, "total": 10, "units": "files", "message": "copying"}),
    (ev("progress", 10, 10, None, None), "progress", {"current": 10, "total": 10}),
    (ev("tool_result", "call-1", {"rows": [1, 2]}), "tool_result", {"call_id": "call-1", "result": {"rows": [1, 2]}}),
    (ev("tool_result", "call-1", None), "tool_result", {"call_id": "call-1", "result": None}),
    (ev("tool_error", "call-2", {"code": "TIMEOUT", "message": "slow"}), "tool_result",
     {"call_id": "call-2", "error": {"code": "TIMEOUT", "message": "slow", "retryable": False}}),
    (ev("artifact_ref", "s3://b/k", "text/plain", 12, "ab" * 32), "artifact_ref",
     {"uri": "s3://b/k", "content_type": "text/plain", "byte_size": 12, "sha256": "ab" * 32}),
    (ev("artifact_ref", "file:///x", "application/json", None, None), "artifact_ref",
     {"uri": "file:///x", "content_type": "application/json"}),
]


@pytest.mark.parametrize(("frame", "kind", "body"), HONEST_EVENTS)
def test_honest_events(frame: list[Any], kind: str, body: dict[str, Any]) -> None:
    assert wf().actions(frame) == [Event(kind, body)]
    orjson.dumps(body)


def test_every_event_op_is_covered() -> None:
    covered = {f[2] for f, _, _ in HONEST_EVENTS} | {"stream_open", "chunk", "stream_close"}
    assert covered == pm.EVENT_OPS


@pytest.mark.parametrize("op", sorted(pm.CALL_OPS))
def test_honest_calls(op: str) -> None:
    assert wf().actions(["call", JOB, 7, op, ["a", {"b": 1}]]) == [Call(7, op, ["a", {"b": 1}])]


def test_done() -> None:
    assert wf().actions(["done", JOB, {"answer": 42}]) == [Done({"answer": 42})]
    assert wf().actions(["done", JOB, None]) == [Done(None)]


def test_fail() -> None:
    acts = wf().actions(["fail", JOB, {"code": "PERMISSION_DENIED", "message": "no", "details": {"why": "x"},
                                       "traceback": "Traceback ..."}])
    assert acts == [Fail({"code": "PERMISSION_DENIED", "message": "no", "retryable": False,
                          "details": {"why": "x"}}, "Traceback ...")]


def test_fail_without_traceback() -> None:
    (act,) = wf().actions(["fail", JOB, {"code": "INTERNAL_ERROR", "message": "boom", "traceback": 5}])
    assert act == Fail({"code": "INTERNAL_ERROR", "message": "boom", "retryable": True}, None)


def test_done_and_fail_say_what_the_job_left_in_the_worker() -> None:
    assert wf().actions(["done", JOB, 1, []]) == [Done(1, [])]
    assert wf().actions(["done", JOB, 1, ["thread", "child process", "thread"]]) == [
        Done(1, ["child process", "thread"])]
    (act,) = wf().actions(["fail", JOB, {"code": "INTERNAL_ERROR", "message": "m"}, ["sys.modules changed"]])
    assert isinstance(act, Fail) and act.left == ["sys.modules changed"]


@pytest.mark.parametrize("left", ["thread", [1], ["a file"], None, {"thread": 1}, [["thread"]]])
def test_what_the_job_left_is_checked(left: Any) -> None:
    with pytest.raises(WorkerProtocolError):
        wf().actions(["done", JOB, 1, left])
    with pytest.raises(WorkerProtocolError):
        wf().actions(["fail", JOB, {"code": "INTERNAL_ERROR", "message": "m"}, left])


# -- streams ----------------------------------------------------------------------------------------

def test_utf8_stream() -> None:
    w = wf()
    assert w.actions(ev("stream_open", "utf8")) == []
    (a,) = w.actions(ev("chunk", "hello "))
    (b,) = w.actions(ev("chunk", "world"))
    (c,) = w.actions(ev("stream_close"))
    for e in (a, b, c):
        assert isinstance(e, Event) and e.kind == "result_chunk"
    bodies = [a.body, b.body, c.body]  # type: ignore[union-attr]
    assert [x["chunk_seq"] for x in bodies] == [0, 1, 2]
    assert [x["more"] for x in bodies] == [True, True, False]
    assert "".join(x["data"] for x in bodies) == "hello world"
    assert {x["encoding"] for x in bodies} == {"utf8"}
    assert len({x["result_id"] for x in bodies}) == 1
    assert re.match(r"^res_[0-9A-HJKMNP-TV-Z]{26}$", bodies[0]["result_id"])
    assert w.actions(ev("stream_close")) == []  # closing twice is a no-op


def test_done_closes_open_stream() -> None:
    w = wf()
    w.actions(ev("stream_open", "base64"))
    w.actions(ev("chunk", b"abc"))
    acts = w.actions(["done", JOB, None])
    assert len(acts) == 2
    last, done = acts
    assert isinstance(last, Event) and last.body["more"] is False and last.body["data"] == ""
    assert last.body["chunk_seq"] == 1
    assert done == Done(None)


def test_done_after_closed_stream_adds_nothing() -> None:
    w = wf()
    w.actions(ev("stream_open", "utf8"))
    w.actions(ev("stream_close"))
    assert w.actions(["done", JOB, None]) == [Done(None)]


def test_utf8_chunk_splitting_of_escaped_text() -> None:
    max_text = 65536
    w = wf(max_result_bytes=1 << 20, max_chunk_text=max_text)
    text = "\x01" * 100_000  # 6 bytes each once JSON-escaped
    w.actions(ev("stream_open", "utf8"))
    acts = w.actions(ev("chunk", text)) + w.actions(ev("stream_close"))
    bodies = [a.body for a in acts if isinstance(a, Event)]
    assert len(bodies) == len(acts) > 2
    for b in bodies:
        assert len(orjson.dumps(b)) < max_text + 200
    assert "".join(b["data"] for b in bodies) == text
    assert [b["chunk_seq"] for b in bodies] == list(range(len(bodies)))
    assert [b["more"] for b in bodies] == [True] * (len(bodies) - 1) + [False]
    assert bodies[-1]["data"] == ""


def test_utf8_chunk_splitting_mixed_text() -> None:
    max_text = 1024
    w = wf(max_chunk_text=max_text)
    text = ("é\"\\\n😀a\x00" * 2000)
    w.actions(ev("stream_open", "utf8"))
    bodies = [a.body for a in w.actions(ev("chunk", text)) if isinstance(a, Event)]
    for b in bodies:
        assert len(orjson.dumps(b["data"])) <= max_text + 2
    assert "".join(b["data"] for b in bodies) == text


def test_base64_chunks_decode_to_input() -> None:
    max_text = 4096
    w = wf(max_chunk_text=max_text)
    data = os.urandom(50_000)
    w.actions(ev("stream_open", "base64"))
    acts = w.actions(ev("chunk", data[:20_000])) + w.actions(ev("chunk", data[20_000:]))
    acts += w.actions(ev("stream_close"))
    bodies = [a.body for a in acts if isinstance(a, Event)]
    for b in bodies:
        assert len(b["data"]) <= max_text
        assert b["encoding"] == "base64"
    assert b"".join(base64.b64decode(b["data"]) for b in bodies) == data
    assert [b["chunk_seq"] for b in bodies] == list(range(len(bodies)))
    assert bodies[-1]["more"] is False and all(b["more"] for b in bodies[:-1])


def test_stream_exactly_at_cap_allowed_then_over_rejected() -> None:
    w = wf(max_result_bytes=10)
    w.actions(ev("stream_open", "base64"))
    w.actions(ev("chunk", b"x" * 10))
    with pytest.raises(WorkerProtocolError, match="exceeds 10 bytes"):
        w.actions(ev("chunk", b"x"))


def test_utf8_cap_counts_encoded_bytes() -> None:
    w = wf(max_result_bytes=5)
    w.actions(ev("stream_open", "utf8"))
    with pytest.raises(WorkerProtocolError):
        w.actions(ev("chunk", "ééé"))  # 3 characters, 6 bytes


# -- hostile frames ---------------------------------------------------------------------------------

HOSTILE: list[Any] = [
    None, 5, "ev", {}, [], ["ev"], ["ev", JOB],
    ["ev", OTHER, "log", ["info", "m", None]],
    ["done", OTHER, None],
    ["call", OTHER, 1, "budget", []],
    ["ev", None, "log", ["info", "m", None]],
    ["reply", JOB, 1, True, None],
    ["job", JOB, {}],
    ["bogus", JOB, 1],
    [b"ev", JOB, "log", ["info", "m", None]],
    # event shape
    ["ev", JOB, "log"],
    ["ev", JOB, "log", ["info", "m", None], "extra"],
    ["ev", JOB, "log", ("info", "m", None)],
    ["ev", JOB, "log", {"level": "info"}],
    ["ev", JOB, "frobnicate", []],
    ["ev", JOB, None, []],
    ["ev", JOB, 5, []],
    # log
    ev("log", "info", "m"),
    ev("log", "info", "m", None, None),
    ev("log", "trace", "m", None),
    ev("log", "INFO", "m", None),
    ev("log", None, "m", None),
    ev("log", "info", b"m", None),
    ev("log", "info", None, None),
    ev("log", "info", "m", {"k": b"\x00bytes"}),
    ev("log", "info", "m", {"k": {"n": [b"x"]}}),
    ev("log", "info", "m", ["a"]),
    ev("log", "info", "m", "fields"),
    # thought
    ev("thought"), ev("thought", 5), ev("thought", "a", "b"),
    # status
    ev("status", "credential_rotated", None),
    ev("status", "back_pressure", "m"),
    ev("status", "queued", "position 1"),  # only the supervisor says a job waits
    ev("status", "", None),
    ev("status", None, None),
    ev("status", "ok", 5),
    ev("status", "ok"),
    # metric
    ev("metric", "x", "1", None, None),
    ev("metric", "x", True, None, None),
    ev("metric", "x", None, None, None),
    ev("metric", "x", float("nan"), None, None),
    ev("metric", "", 1, None, None),
    ev("metric", None, 1, None, None),
    ev("metric", "x", 1, 5, None),
    ev("metric", "x", 1, None, {"a": 1}),
    ev("metric", "x", 1, None, ["a"]),
    ev("metric", "x", 1, None),
    # progress
    ev("progress", 11, 10, None, None),
    ev("progress", -1, None, None, None),
    ev("progress", 1.5, None, None, None),
    ev("progress", True, None, None, None),
    ev("progress", None, None, None, None),
    ev("progress", 1, -5, None, None),
    ev("progress", 1, "10", None, None),
    ev("progress", 1, 10, 3, None),
    ev("progress", 1, 10, None, 3),
    ev("progress", 1, 10, None),
    # tool_result / tool_error
    ev("tool_result", "", 1),
    ev("tool_result", None, 1),
    ev("tool_result", "c", b"bytes"),
    ev("tool_result", "c", {"x": b"bytes"}),
    ev("tool_result", "c"),
    ev("tool_error", "c", {"code": "NOPE", "message": "m"}),
    ev("tool_error", "c", {"code": "TIMEOUT"}),
    ev("tool_error", "c", "TIMEOUT"),
    ev("tool_error", "", {"code": "TIMEOUT", "message": "m"}),
    # artifact_ref
    ev("artifact_ref", "", "text/plain", None, None),
    ev("artifact_ref", "u", None, None, None),
    ev("artifact_ref", "u", "t", -1, None),
    ev("artifact_ref", "u", "t", "12", None),
    ev("artifact_ref", "u", "t", None, 5),
    ev("artifact_ref", "u", "t", None),
    # streams
    ev("stream_open", "hex"),
    ev("stream_open", None),
    ev("stream_open"),
    ev("stream_open", "utf8", "extra"),
    ev("chunk", "data"),
    ev("chunk", b"data"),
    ev("stream_close", "x"),
    # call
    ["call", JOB, "1", "budget", []],
    ["call", JOB, 1.0, "budget", []],
    ["call", JOB, 1, "rm_rf", []],
    ["call", JOB, 1, None, []],
    ["call", JOB, 1, "budget", None],
    ["call", JOB, 1, "budget", "args"],
    ["call", JOB, 1, "budget"],
    ["call", JOB, 1, "budget", [], "extra"],
    # done / fail
    ["done", JOB, b"bytes"],
    ["done", JOB, {"k": b"bytes"}],
    ["done", JOB, None, "extra"],
    ["fail", JOB, None],
    ["fail", JOB, "boom"],
    ["fail", JOB, {"message": "no code"}],
    ["fail", JOB, {"code": "NOPE", "message": "m"}],
    ["fail", JOB, {"code": "TIMEOUT", "message": 5}],
    ["fail", JOB, {"code": "TIMEOUT", "message": "m", "retryable": "no"}],
    ["fail", JOB, {"code": "TIMEOUT", "message": "m", "details": [1]}],
    ["fail", JOB, {"code": "TIMEOUT", "message": "m", "details": {"x": b"bytes"}}],
    ["fail", JOB, {"code": "TIMEOUT", "message": "m"}, "extra"],
]


@pytest.mark.parametrize("frame", HOSTILE, ids=[f"h{i}" for i in range(len(HOSTILE))])
def test_hostile_frames_rejected(frame: Any) -> None:
    with pytest.raises(WorkerProtocolError):
        wf().actions(frame)


def test_second_stream_open_rejected() -> None:
    w = wf()
    w.actions(ev("stream_open", "utf8"))
    with pytest.raises(WorkerProtocolError, match="second"):
        w.actions(ev("stream_open", "utf8"))


def test_stream_reopen_after_close_rejected() -> None:
    w = wf()
    w.actions(ev("stream_open", "utf8"))
    w.actions(ev("stream_close"))
    with pytest.raises(WorkerProtocolError):
        w.actions(ev("stream_open", "base64"))


def test_chunk_after_close_rejected() -> None:
    w = wf()
    w.actions(ev("stream_open", "utf8"))
    w.actions(ev("stream_close"))
    with pytest.raises(WorkerProtocolError, match="outside"):
        w.actions(ev("chunk", "late"))


@pytest.mark.parametrize(("encoding", "data"), [("utf8", b"bytes"), ("base64", "text"), ("utf8", None)])
def test_chunk_of_wrong_type_rejected(encoding: str, data: Any) -> None:
    w = wf()
    w.actions(ev("stream_open", encoding))
    with pytest.raises(WorkerProtocolError):
        w.actions(ev("chunk", data))


def test_stream_over_max_result_bytes_rejected() -> None:
    w = wf(max_result_bytes=100)
    w.actions(ev("stream_open", "utf8"))
    w.actions(ev("chunk", "x" * 60))
    with pytest.raises(WorkerProtocolError, match="exceeds 100 bytes"):
        w.actions(ev("chunk", "x" * 41))


# -- known bugs ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "frame",
    [
        ["call", JOB, 1, ["budget"], []],
        ["call", JOB, 1, {"op": 1}, []],
        ev("log", ["info"], "m", None),
        ev("log", {"l": 1}, "m", None),
        ["fail", JOB, {"code": ["TIMEOUT"], "message": "m"}],
        ev("tool_error", "c", {"code": {}, "message": "m"}),
    ],
)
def test_unhashable_values_rejected(frame: Any) -> None:
    with pytest.raises(WorkerProtocolError):
        wf().actions(frame)


def test_tool_error_details_must_be_json() -> None:
    with pytest.raises(WorkerProtocolError):
        wf().actions(ev("tool_error", "c", {"code": "TIMEOUT", "message": "m", "details": {"b": b"x"}}))


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_metric_value_must_be_finite(value: float) -> None:
    with pytest.raises(WorkerProtocolError):
        wf().actions(ev("metric", "cost.x", value, "USD", None))


@pytest.mark.parametrize("fields", [0, "", False, []])
def test_falsy_non_object_log_fields_rejected(fields: Any) -> None:
    with pytest.raises(WorkerProtocolError):
        wf().actions(ev("log", "info", "m", fields))


@pytest.mark.parametrize("call_id", [True, False, -1])
def test_call_id_must_be_non_negative_int(call_id: Any) -> None:
    with pytest.raises(WorkerProtocolError):
        wf().actions(["call", JOB, call_id, "budget", []])


# -- call arguments are bounded before any work (answered INVALID_REQUEST, the job goes on) -----

from shared.errors import InvalidRequest  # noqa: E402
from supervisor.jobs.calls import check_call  # noqa: E402


@pytest.mark.parametrize(("op", "args", "needle"), [
    ("validate_lease_op", ["fs.read", "/" + "a/" * 300000], "target is longer than 4095 bytes"),
    ("validate_lease_op", ["fs.write", "/" + "a" * 4095], "PATH_MAX 4096"),
    ("validate_lease_op", ["fs.read", "/tmp/" + "n" * 256], "segment longer than 255 bytes"),
    ("validate_lease_op", ["fs.read", "/tmp/" + "é" * 128], "(NAME_MAX)"),
    ("validate_lease_op", ["fs.read", "/tmp/a\0b"], "NUL"),
    ("validate_lease_op", ["net.fetch", "https://x/" + "p" * 8192], "longer than 8192 bytes"),
    ("validate_lease_op", ["tool.call", "t" * 4097], "longer than 4096 bytes"),
    ("validate_lease_op", ["x-vendor.a." + "b" * 300, "t"], "capability is longer than 256 bytes"),
    ("validate_lease_op", ["", "t"], "capability is empty"),
    ("validate_lease_op", ["fs.read", 5], "target is not a string"),
    ("validate_lease_op", ["fs.read"], "takes 2 arguments"),
    ("tool_call", ["t" * 4097, {}], "tool name is longer than 4096 bytes"),
    ("tool_call", ["", {}], "tool name is empty"),
    ("delegate", ["a" * 5000, None, None], "agent is longer than 4096 bytes"),
    ("delegate", ["a", None, {"fs.read": ["/" + "x/" * 3000]}], "PATH_MAX"),
    ("delegate", ["a", None, {"fs.read": [{"big": "x" * 10000}]}], "type dict"),
    ("rotate_credential", ["c" * 257, "v"], "credential id is longer than 256 bytes"),
    ("rotate_credential", ["c", "v" * 16385], "credential value is longer than 16384 bytes"),
    ("reserve_budget", [{"USD": "1" * 65}], "longer than 64 bytes"),
    ("reserve_budget", [{f"C{i}": 1 for i in range(65)}], "more than 64 currencies"),
    ("reserve_budget", [{"USD": 2 ** 70}], "wider than 64 bits"),
    ("reserve_budget", [{"USD": [1]}], "not a number"),
    ("reserve_budget", [[1]], "mapping"),
    ("budget", [1], "takes 0 arguments"),
])
def test_oversized_call_arguments_are_refused_naming_the_bound(op: str, args: list[Any], needle: str) -> None:
    with pytest.raises(InvalidRequest) as ei:
        check_call(op, args)
    assert needle in ei.value.message, ei.value.message
    assert len(ei.value.message) < 300


@pytest.mark.parametrize(("op", "args"), [
    ("validate_lease_op", ["fs.read", "/" + "/".join(["n" * 255] * 15) + "/" + "x" * 254]),
    ("validate_lease_op", ["net.fetch", "https://x/" + "p" * 8000]),
    ("validate_lease_op", ["tool.call", "t" * 4096]),
    ("validate_lease_op", ["fs.read", "relative"]),  # refused later, by the lease check
    ("tool_call", ["search.web", {"q": "x" * 100000}]),  # tool args: bounded by the frame
    ("delegate", ["echo", {"x": 1}, {"fs.read": ["/data/**"]}]),
    ("delegate", ["echo", None, None]),
    ("rotate_credential", ["cred_1", "v" * 16384]),
    ("reserve_budget", [{"USD": "1.25", "EUR": 3, "credits": 0.5}]),
    ("budget", []),
])
def test_call_arguments_within_the_bounds_pass(op: str, args: list[Any]) -> None:
    check_call(op, args)


def test_bounding_a_huge_argument_is_cheap() -> None:
    import time

    start = time.perf_counter()
    for _ in range(20):
        with pytest.raises(InvalidRequest):
            check_call("validate_lease_op", ["fs.read", "/" + "a/" * 300000])
    assert time.perf_counter() - start < 1.0
