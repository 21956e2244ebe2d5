"""Properties of WorkerFrames: hostile values only ever raise WorkerProtocolError."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shared import pipe_messages as pm
from supervisor.jobs.worker_rpc import Event, WorkerFrames, WorkerProtocolError

JOB = "job_01ARZ3NDEKTSV4RRFFQ69G5FAV"

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=20) | st.binary(max_size=20)
)
hashable_words = st.sampled_from(
    sorted(pm.EVENT_OPS | pm.CALL_OPS | {"ev", "call", "done", "fail", "info", "utf8", "base64",
                                          "TIMEOUT", "INTERNAL_ERROR", "credential_rotated"})
)
msgpack_values = st.recursive(
    scalars | hashable_words,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | hashable_words,
                                                                  inner, max_size=4),
    max_leaves=15,
)


def _frames(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly frame-shaped lists (right tag and job id), sometimes anything."""
    tag = st.sampled_from(["ev", "call", "done", "fail"]) | leaf
    job = st.just(JOB) | leaf
    args = st.lists(leaf, max_size=5)
    return st.one_of(
        st.tuples(st.just("ev"), st.just(JOB), hashable_words | leaf, args).map(list),
        st.tuples(st.just("call"), st.just(JOB), st.integers(-3, 3) | leaf, hashable_words | leaf, args).map(list),
        st.tuples(st.sampled_from(["done", "fail"]), st.just(JOB),
                  st.fixed_dictionaries({"code": st.sampled_from(["TIMEOUT", "X"]) | leaf,
                                         "message": st.text(max_size=5) | leaf}) | leaf).map(list),
        st.lists(st.none(), max_size=0).flatmap(lambda _: st.tuples(tag, job).map(list)),
        st.lists(leaf, max_size=6).map(lambda xs: [*xs]),
        leaf,
    )


scalar_leaf = scalars | hashable_words


def _feed(w: WorkerFrames, frames: list[Any]) -> None:
    for f in frames:
        try:
            acts = w.actions(f)
        except WorkerProtocolError:
            continue
        assert isinstance(acts, list)
        for a in acts:
            if isinstance(a, Event):
                orjson.dumps(a.body)  # every event body must serialise


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frames(scalar_leaf), max_size=6))
def test_frames_without_unhashable_keys_only_raise_protocol_error(frames: list[Any]) -> None:
    """Frames built from hashable scalars: actions or WorkerProtocolError."""
    _feed(WorkerFrames(JOB, 1 << 16, 1024), frames)


@settings(max_examples=300, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frames(msgpack_values), max_size=6))
def test_any_msgpack_value_only_raises_protocol_error(frames: list[Any]) -> None:
    _feed(WorkerFrames(JOB, 1 << 16, 1024), frames)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=3000), st.integers(min_value=64, max_value=2048))
def test_utf8_chunks_reassemble(text: str, max_text: int) -> None:
    w = WorkerFrames(JOB, 1 << 20, max_text)
    w.actions(["ev", JOB, "stream_open", ["utf8"]])
    acts = w.actions(["ev", JOB, "chunk", [text]]) + w.actions(["ev", JOB, "stream_close", []])
    bodies = [a.body for a in acts if isinstance(a, Event)]
    assert "".join(b["data"] for b in bodies) == text
    assert [b["chunk_seq"] for b in bodies] == list(range(len(bodies)))
    assert bodies[-1]["more"] is False and all(b["more"] for b in bodies[:-1])
    for b in bodies:
        assert len(orjson.dumps(b["data"])) <= max_text + 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=2000), max_size=5), st.integers(min_value=4, max_value=2048))
def test_base64_chunks_reassemble(pieces: list[bytes], max_text: int) -> None:
    w = WorkerFrames(JOB, 1 << 20, max_text)
    w.actions(["ev", JOB, "stream_open", ["base64"]])
    acts = []
    for p in pieces:
        acts += w.actions(["ev", JOB, "chunk", [p]])
    acts += w.actions(["done", JOB, None])
    bodies = [a.body for a in acts if isinstance(a, Event)]
    assert b"".join(base64.b64decode(b["data"]) for b in bodies) == b"".join(pieces)
    assert [b["chunk_seq"] for b in bodies] == list(range(len(bodies)))
    assert all(len(b["data"]) <= max_text for b in bodies)


# -- the arguments of calls: bounded before any work ----------------------------------------------

from shared.errors import InvalidRequest  # noqa: E402
from supervisor.jobs.calls import CALL_ARITY, check_call  # noqa: E402

huge_texts = st.sampled_from([
    "/" + "a/" * 300000,  # the reported one: 600 KB of path
    "/" + "x" * 5000,
    "/tmp/" + "s" * 256,
    "https://h/" + "p" * 9000,
    "t" * 5000,
    "/ok/path",
    "é" * 3000,
    "**/" * 2000,
]) | st.text(max_size=300)
call_args = st.lists(huge_texts | msgpack_values, max_size=4)
caps = st.sampled_from(["fs.read", "fs.write", "net.fetch", "tool.call", "model.use", "x-vendor.a.b",
                        "c" * 300]) | st.text(max_size=20)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CALL_ARITY)), call_args)
def test_check_call_raises_only_invalid_request(op: str, args: list[Any]) -> None:
    try:
        check_call(op, args)
    except InvalidRequest as e:
        assert len(e.message) < 400  # names the argument and the bound, never repeats a big one


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(caps, huge_texts)
def test_validate_lease_op_targets_within_the_bounds_pass_and_others_say_which_bound(cap: str, target: str) -> None:
    from shared.lease import MAX_CAPABILITY_LEN, bound_error

    try:
        check_call("validate_lease_op", [cap, target])
    except InvalidRequest as e:
        assert cap == "" or len(cap.encode()) > MAX_CAPABILITY_LEN or bound_error(cap, target) is not None
        assert "capability" in e.message or "target" in e.message
        if cap in ("fs.read", "fs.write") and len(target.encode()) >= 4096:
            assert "PATH_MAX 4096" in e.message
        return
    assert bound_error(cap, target) is None
    if cap in ("fs.read", "fs.write"):
        assert len(target.encode()) <= 4095 and all(len(s.encode()) <= 255 for s in target.split("/"))
