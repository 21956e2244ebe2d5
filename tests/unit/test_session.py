"""supervisor/session.py driven as a state machine: bytes in, queued frames out, no sockets."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from shared.envelope import Envelope, frame
from shared.errors import InvalidRequest, Unauthenticated
from shared.messages import FEATURES
from supervisor.core.frames import GO, PY
from supervisor.core.requests import Cancel, ListJobs, Request, Submit, Subscribe, Unsubscribe
from supervisor.core.session import (
    ANONYMOUS, FLAVOUR_KEY, STALL_LIMIT, FrameTooLarge, Session, SessionSettings, authenticate, check_hello, detect_flavour,
    negotiate,
)
from supervisor.jobs.service import JobService

MiB = 1024 * 1024
ULID_ID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
UUID_ID = "123e4567-e89b-42d3-a456-426614174000"


# -- the harness: a session fed frames and a fake clock; requests and frames read back ----------------

AGENTS = [{"name": "echo", "versions": ["1.0.0"], "default": "1.0.0"}]


@dataclass
class FakeJobs:
    jobs: dict[str, Any] = field(default_factory=dict)


class FakeRunner:
    def __init__(self) -> None:
        self.stops: list[tuple[str, str]] = []

    def request_stop(self, kind: str, reason: str) -> None:
        self.stops.append((kind, reason))


@dataclass
class FakeJob:
    principal: str
    owner_id: str
    done: bool = False
    runner: FakeRunner = field(default_factory=FakeRunner)
    id: str = "job_1"


class Harness:
    def __init__(self, features: list[str] | None = None, flavour: str = PY, principal: str = "alice",
                 frame_cap: int = MiB, admins: tuple[str, ...] = (), heartbeat: float = 30) -> None:
        self.now = 1000.0
        self.closes: list[tuple[int, str]] = []
        self.kept: list[tuple[str, int, str, bytes]] = []
        self.requests: list[Request] = []
        settings = SessionSettings(resume_window=600, heartbeat_interval=heartbeat, back_pressure_threshold=1000,
                                   log_bytes=64 * MiB, frame_cap=frame_cap, admin=principal in admins)
        self.session = Session(settings, principal, flavour, list(FEATURES if features is None else features),
                               lambda *row: self.kept.append(row),
                               lambda code, reason: self.closes.append((code, reason)), self.now)
        self.jobs = FakeJobs()
        self.service = JobService(self.jobs, None, None, None, None, None, None, None, None)  # type: ignore[arg-type]

    def send(self, data: str | bytes | dict[str, Any]) -> list[dict[str, Any]]:
        if isinstance(data, dict):
            data = orjson.dumps(data)
        req = self.session.receive(data, self.now)
        if req is not None:
            self.requests.append(req)
            if isinstance(req, Cancel):  # carried out as the runtime does
                try:
                    self.service.cancel(self.session, req)
                except Exception as e:
                    self.session.failed(req, e)
        return self.drain()

    def drain(self) -> list[dict[str, Any]]:
        q = self.session.outbox._queue
        out = [orjson.loads(b) for b in q]
        q.clear()
        return out


def env(type_: str, payload: dict[str, Any] | None = None, id_: str = "req-1", **extra: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"arcp": "1.1", "id": id_, "type": type_, "payload": payload or {}}
    e.update(extra)
    return e


def assert_invalid(frames: list[dict[str, Any]], request_id: str | None) -> dict[str, Any]:
    assert len(frames) == 1
    (f,) = frames
    assert f["arcp"] == "1.1" and f["type"] == "session.error"
    p = f["payload"]
    assert p["code"] == "INVALID_REQUEST" and p["retryable"] is False
    assert isinstance(p["message"], str) and p["message"]
    if request_id is None:
        assert "request_id" not in p
    else:
        assert p["request_id"] == request_id
    return p


# -- malformed input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe", "{\"a\": }", b"{\"arcp\": \"1.1\""])
def test_broken_json(data: bytes | str) -> None:
    p = assert_invalid(Harness().send(data), None)
    assert "JSON" in p["message"]


@pytest.mark.parametrize("data", [b"[1]", b"42", b"null", b"\"str\"", b"true"])
def test_non_object_json(data: bytes) -> None:
    p = assert_invalid(Harness().send(data), None)
    assert "object" in p["message"]


def test_missing_id() -> None:
    e = env("session.ping", {"nonce": "n"})
    del e["id"]
    p = assert_invalid(Harness().send(e), None)
    assert "'id'" in p["message"]


def test_non_string_id_gets_no_request_id() -> None:
    assert_invalid(Harness().send(env("session.ping", {"nonce": "n"}, id_=7)), None)  # type: ignore[arg-type]


def test_missing_type() -> None:
    e = env("x")
    del e["type"]
    p = assert_invalid(Harness().send(e), "req-1")
    assert "'type'" in p["message"]


def test_wrong_version() -> None:
    p = assert_invalid(Harness().send(env("session.ping", {"nonce": "n"}, arcp="2.0")), "req-1")
    assert "'arcp'" in p["message"]


def test_unknown_type_named() -> None:
    p = assert_invalid(Harness().send(env("job.frobnicate")), "req-1")
    assert "job.frobnicate" in p["message"]


def test_second_hello() -> None:
    p = assert_invalid(Harness().send(env("session.hello", {"client": {"name": "x"}})), "req-1")
    assert "session.hello" in p["message"]


def test_list_jobs_needs_feature() -> None:
    h = Harness(features=["heartbeat"])
    p = assert_invalid(h.send(env("session.list_jobs")), "req-1")
    assert "list_jobs" in p["message"]
    assert h.requests == []


def test_list_jobs_with_feature() -> None:
    h = Harness()
    assert h.send(env("session.list_jobs", id_="lj")) == []
    (req,) = h.requests
    assert isinstance(req, ListJobs) and req.env.id == "lj"


@pytest.mark.parametrize("t", ["job.subscribe", "job.unsubscribe"])
def test_subscribe_needs_feature_and_job_id(t: str) -> None:
    assert_invalid(Harness(features=[]).send(env(t, {"job_id": "job_1"})), "req-1")
    h = Harness()
    p = assert_invalid(h.send(env(t)), "req-1")
    assert "job_id" in p["message"]
    assert h.send(env(t, {"job_id": "job_1"})) == []
    assert h.send(env(t, job_id="job_2")) == []
    kind = Subscribe if t == "job.subscribe" else Unsubscribe
    assert [(type(r), r.job_id) for r in h.requests] == [(kind, "job_1"), (kind, "job_2")]  # type: ignore[union-attr]


@pytest.mark.parametrize("payload", [{}, {"job_id": ""}, {"job_id": 5}])
def test_cancel_without_job_id(payload: dict[str, Any]) -> None:
    p = assert_invalid(Harness().send(env("job.cancel", payload)), "req-1")
    assert "job" in p["message"]


def test_ping_without_nonce() -> None:
    p = assert_invalid(Harness().send(env("session.ping", {"nonce": 5})), "req-1")
    assert "nonce" in p["message"]


def test_error_carries_session_id() -> None:
    h = Harness()
    (f,) = h.send(b"[1]")
    assert f["session_id"] == h.session.id
    assert re.match(r"^sess_[0-9A-HJKMNP-TV-Z]{26}$", h.session.id)


# -- well-formed requests -----------------------------------------------------------------------------

def test_ping_pong() -> None:
    h = Harness()
    (f,) = h.send(env("session.ping", {"nonce": "abc"}))
    assert f["type"] == "session.pong" and f["payload"]["ping_nonce"] == "abc"
    assert f["session_id"] == h.session.id
    assert f["payload"]["received_at"].endswith("Z")
    assert "event_seq" not in f


def test_pong_and_ack_are_silent() -> None:
    h = Harness()
    assert h.send(env("session.pong", {"ping_nonce": "x"})) == []
    assert h.send(env("session.ack", {"last_processed_seq": 0})) == []


def test_ack_monotonic_and_bounded() -> None:
    h = Harness()
    s = h.session
    for _ in range(5):
        s.send_seq(frame("job.event", "e", {}), "job_1")
    h.drain()
    assert h.send(env("session.ack", {"last_processed_seq": 3})) == []
    assert s.last_ack == 3
    assert h.send(env("session.ack", {"last_processed_seq": 1})) == []
    assert s.last_ack == 3
    p = assert_invalid(h.send(env("session.ack", {"last_processed_seq": 6})), "req-1")
    assert "6" in p["message"]
    assert s.last_ack == 3
    assert h.send(env("session.ack", {"last_processed_seq": 5})) == []
    assert s.last_ack == 5


@pytest.mark.parametrize("seq", [True, -1, "3", None, 1.0])
def test_ack_malformed(seq: Any) -> None:
    h = Harness()
    h.session.send_seq(frame("job.event", "e", {}), "job_1")
    h.drain()
    p = assert_invalid(h.send(env("session.ack", {"last_processed_seq": seq})), "req-1")
    assert "last_processed_seq" in p["message"]
    assert h.session.last_ack == 0


def test_ack_ignored_without_feature() -> None:
    h = Harness(features=[])
    h.session.send_seq(frame("job.event", "e", {}), "job_1")
    h.send(env("session.ack", {"last_processed_seq": 1}))
    assert h.session.last_ack == 0


def test_submit_goes_to_runtime() -> None:
    h = Harness()
    assert h.send(env("job.submit", {"agent": "echo"}, id_="sub")) == []
    (req,) = h.requests
    assert isinstance(req, Submit) and req.env.id == "sub"


@pytest.mark.parametrize("t", ["session.bye", "session.close"])
def test_bye_closes(t: str) -> None:
    h = Harness()
    (f,) = h.send(env(t, {"reason": "done here"}))
    assert f["type"] == "session.closed" and f["payload"]["reason"] == "done here"
    assert h.session.closed
    assert h.closes == [(1000, "bye")]


def test_bye_default_reason() -> None:
    h = Harness()
    (f,) = h.send(env("session.bye", {"reason": 5}))
    assert f["payload"]["reason"] == "closed"


# -- cancel ---------------------------------------------------------------------------------------------

def test_cancel_own_job() -> None:
    h = Harness()
    job = FakeJob("alice", h.session.id)
    h.jobs.jobs["job_1"] = job
    assert h.send(env("job.cancel", {"reason": "enough"}, job_id="job_1")) == []
    assert job.runner.stops == [("cancel", "enough")]
    assert h.send(env("job.cancel", {"job_id": "job_1"})) == []
    assert job.runner.stops[-1] == ("cancel", "cancelled by client")


def test_cancel_finished_job_is_noop() -> None:
    h = Harness()
    job = FakeJob("alice", h.session.id, done=True)
    h.jobs.jobs["job_1"] = job
    assert h.send(env("job.cancel", job_id="job_1")) == []
    assert job.runner.stops == []


def test_cancel_unknown_job() -> None:
    h = Harness()
    (f,) = h.send(env("job.cancel", job_id="job_404"))
    assert f["payload"]["code"] == "JOB_NOT_FOUND"
    assert f["payload"]["request_id"] == "req-1" and f["payload"]["job_id"] == "job_404"
    assert f["job_id"] == "job_404"


def test_cancel_foreign_job_go_flavour_denied() -> None:
    h = Harness(flavour=GO)
    other = Harness()
    job = FakeJob("alice", other.session.id)
    h.jobs.jobs["job_1"] = job
    (f,) = h.send(env("job.cancel", job_id="job_1"))
    assert f["payload"]["code"] == "PERMISSION_DENIED"
    assert job.runner.stops == []


def test_cancel_foreign_job_py_flavour_silent() -> None:
    h = Harness(flavour=PY)
    job = FakeJob("bob", h.session.id)
    h.jobs.jobs["job_1"] = job
    assert h.send(env("job.cancel", job_id="job_1")) == []
    assert job.runner.stops == []


@pytest.mark.parametrize("flavour", [GO, PY])
def test_an_admin_cancels_any_job(flavour: str) -> None:
    h = Harness(flavour=flavour, principal="root", admins=("root",))
    assert h.session.admin
    job = FakeJob("bob", "sess_other")
    h.jobs.jobs["job_1"] = job
    assert h.send(env("job.cancel", {"reason": "operator"}, job_id="job_1")) == []
    assert job.runner.stops == [("cancel", "operator")]
    done = FakeJob("bob", "sess_other", done=True)
    h.jobs.jobs["job_2"] = done
    assert h.send(env("job.cancel", job_id="job_2")) == [] and done.runner.stops == []
    (f,) = h.send(env("job.cancel", job_id="job_404"))
    assert f["payload"]["code"] == "JOB_NOT_FOUND"


def test_admins_of_the_config_only() -> None:
    assert not Harness(principal="alice", admins=("root",)).session.admin
    h = Harness(flavour=GO, principal="alice", admins=("root",))
    job = FakeJob("bob", "sess_other")
    h.jobs.jobs["job_1"] = job
    (f,) = h.send(env("job.cancel", job_id="job_1"))
    assert f["payload"]["code"] == "PERMISSION_DENIED" and job.runner.stops == []


# -- outbound stamping ---------------------------------------------------------------------------------

def test_send_seq_numbers_from_one() -> None:
    h = Harness()
    got = [h.session.send_seq(frame("job.event", "e", {}, session_id=h.session.id), "job_1") for _ in range(3)]
    h.session.send(frame("session.pong", "p", {}))
    frames = h.drain()
    assert got == [1, 2, 3]
    assert [f.get("event_seq") for f in frames] == [1, 2, 3, None]
    assert h.session.seq == 3
    assert [(sid, seq, job) for sid, seq, job, _ in h.kept] == [
        (h.session.id, 1, "job_1"), (h.session.id, 2, "job_1"), (h.session.id, 3, "job_1")]
    assert orjson.loads(h.kept[0][3])["event_seq"] == 1


def test_send_seq_unlogged() -> None:
    h = Harness()
    assert h.session.send_seq(frame("job.event", "e", {}), "job_1", log=False) == 1
    assert h.kept == []


def test_send_seq_too_large_leaves_counter() -> None:
    h = Harness(frame_cap=200)
    h.session.send_seq(frame("job.event", "e", {}), "job_1")
    with pytest.raises(FrameTooLarge):
        h.session.send_seq(frame("job.event", "e", {"big": "x" * 500}), "job_1")
    h.session.send_seq(frame("job.event", "e", {}), "job_1")
    assert [f["event_seq"] for f in h.drain()] == [1, 2]
    assert [seq for _, seq, _, _ in h.kept] == [1, 2]


def test_reply_too_large_answered_with_error() -> None:
    h = Harness(frame_cap=400)
    (f,) = h.send(env("session.ping", {"nonce": "n" * 500}))
    assert f["type"] == "session.error" and f["payload"]["request_id"] == "req-1"


@pytest.mark.parametrize(
    "e",
    [env("x" * (MiB - 100)), env("job.cancel", job_id="j" * (MiB // 2))],
    ids=["huge-unknown-type", "huge-cancel-job-id"],
)
def test_huge_echo_still_answered(e: dict[str, Any]) -> None:
    h = Harness()
    data = orjson.dumps(e)
    assert len(data) < 2 * MiB  # within the 4 MiB the WebSocket transport accepts
    frames = h.send(data)
    assert len(frames) == 1 and frames[0]["type"] == "session.error"


def test_outbox_get_batch() -> None:
    h = Harness()
    h.session.receive(orjson.dumps(env("session.ping", {"nonce": "a"})), h.now)
    h.session.receive(orjson.dumps(env("session.ping", {"nonce": "b"})), h.now)
    batch = asyncio.run(h.session.outbox.get_batch())
    assert [orjson.loads(b)["payload"]["ping_nonce"] for b in batch] == ["a", "b"]


def test_welcome() -> None:
    h = Harness(features=["heartbeat", "ack"])
    w = h.session.welcome(AGENTS)
    p = w["payload"]
    assert w["type"] == "session.welcome" and w["session_id"] == h.session.id
    assert p["session_id"] == h.session.id and p["resume_token"].startswith("rtk_")
    assert p["resume_window_sec"] == 600 and p["heartbeat_interval_sec"] == 30
    assert p["capabilities"]["features"] == ["heartbeat", "ack"]
    assert p["capabilities"]["agents"] == AGENTS
    assert p["runtime"]["name"] == "arcp-supervisor"
    orjson.dumps(w)


# -- handshake helpers -----------------------------------------------------------------------------------

def hello(payload: dict[str, Any] | None = None, id_: str = ULID_ID, **extra: Any) -> Envelope:
    return check_hello(env("session.hello", payload or {}, id_=id_, **extra))


def test_authenticate_without_tokens_is_anonymous() -> None:
    assert authenticate({}, hello()) == ANONYMOUS
    assert authenticate({}, hello({"auth": {"scheme": "bearer", "token": "whatever"}})) == ANONYMOUS


def test_authenticate_with_tokens() -> None:
    tokens = {"s3cret": "alice", "other": "bob"}
    assert authenticate(tokens, hello({"auth": {"scheme": "bearer", "token": "s3cret"}})) == "alice"
    assert authenticate(tokens, hello({"auth": {"token": "other"}})) == "bob"  # bearer by default


@pytest.mark.parametrize(
    "auth",
    [None, {}, {"token": ""}, {"token": "wrong"}, {"token": "s3cre"}, {"token": "s3cret "}, {"token": 5},
     {"scheme": "basic", "token": "s3cret"}, "s3cret", ["s3cret"]],
)
def test_authenticate_rejects(auth: Any) -> None:
    payload = {} if auth is None else {"auth": auth}
    with pytest.raises(Unauthenticated):
        authenticate({"s3cret": "alice"}, hello(payload))


def test_basic_scheme_rejected_even_without_tokens() -> None:
    with pytest.raises(Unauthenticated):
        authenticate({}, hello({"auth": {"scheme": "basic"}}))


def test_detect_flavour() -> None:
    assert detect_flavour(hello(id_=UUID_ID)) == GO
    assert detect_flavour(hello(id_=ULID_ID)) == PY
    assert detect_flavour(hello(id_="anything-else")) == PY
    assert detect_flavour(hello(id_=UUID_ID, extensions={FLAVOUR_KEY: "py"})) == PY
    assert detect_flavour(hello(id_=ULID_ID, extensions={FLAVOUR_KEY: "go"})) == GO
    assert detect_flavour(hello(id_=ULID_ID, extensions={FLAVOUR_KEY: "rust"})) == PY


def test_negotiate_keeps_known_features_in_canonical_order() -> None:
    asked = ["progress", "bogus", 5, "heartbeat", "ack", None, "ack", "x-vendor.thing"]
    assert negotiate(hello({"capabilities": {"features": asked}})) == ["heartbeat", "ack", "progress"]
    assert negotiate(hello({"capabilities": {"features": list(FEATURES)}})) == list(FEATURES)


@pytest.mark.parametrize("caps", [None, 5, [], {"features": "heartbeat"}, {"features": None}, {}])
def test_negotiate_malformed_is_empty(caps: Any) -> None:
    payload = {} if caps is None else {"capabilities": caps}
    assert negotiate(hello(payload)) == []


def test_check_hello() -> None:
    with pytest.raises(InvalidRequest, match="session.hello"):
        check_hello(env("session.ping", {"nonce": "n"}))
    with pytest.raises(InvalidRequest, match="client"):
        check_hello(env("session.hello", {"client": "me"}))
    with pytest.raises(InvalidRequest):
        check_hello([1])
    assert hello({"client": {"name": "c"}}).type == "session.hello"


# -- time: heartbeats and stalled clients, on a fake clock ---------------------------------------------

def test_heartbeat_pings_after_an_idle_interval_then_ends_a_silent_client() -> None:
    h = Harness(features=["heartbeat"], heartbeat=10)
    h.session.tick(h.now + 9.9)
    assert h.drain() == [] and h.closes == []
    h.session.tick(h.now + 10)
    (ping,) = h.drain()
    assert ping["type"] == "session.ping" and ping["payload"]["nonce"]
    h.session.tick(h.now + 15)  # no second ping within the interval
    assert h.drain() == []
    h.session.tick(h.now + 20)
    (err,) = h.drain()
    assert err["payload"]["code"] == "HEARTBEAT_LOST" and err["payload"]["retryable"] is True
    assert h.closes == [(1001, "heartbeat lost")]


def test_traffic_resets_the_heartbeat() -> None:
    h = Harness(features=["heartbeat"], heartbeat=10)
    h.now += 15
    h.send(env("session.pong"))
    h.session.tick(h.now + 9)
    assert h.drain() == [] and h.closes == []


def test_no_heartbeat_feature_no_ping() -> None:
    h = Harness(features=[], heartbeat=10)
    h.session.tick(h.now + 100)
    assert h.drain() == [] and h.closes == []


def test_a_client_that_stops_reading_is_closed_after_the_stall_limit() -> None:
    h = Harness(features=[])
    ob = h.session.outbox
    for _ in range(ob.high_water):
        h.session.send(frame("session.pong", "p", {}))
    assert ob.stalled_for(time.monotonic()) >= 0 and not ob._writable.is_set()
    h.session.tick(time.monotonic() + STALL_LIMIT - 1)
    assert h.closes == []
    h.session.tick(time.monotonic() + STALL_LIMIT + 1)
    assert h.closes == [(1011, "consumer too slow")]


def test_a_detached_session_does_not_tick() -> None:
    h = Harness(features=["heartbeat"], heartbeat=10)
    h.session.detach(h.now)
    h.session.tick(h.now + 100)
    assert h.closes == []


# -- a request the runtime fails on is answered, never dropped ------------------------------------------

def test_an_unexpected_failure_is_answered_internal_error() -> None:
    h = Harness()
    h.send(env("job.submit", {"agent": "echo"}, id_="sub"))
    (req,) = h.requests
    h.session.failed(req, KeyError("boom"))
    (f,) = h.drain()
    assert f["type"] == "session.error" and f["payload"]["code"] == "INTERNAL_ERROR"
    assert f["payload"]["request_id"] == "sub" and "KeyError" in f["payload"]["message"]
    assert "boom" not in f["payload"]["message"]  # no internals to the client


def test_an_arcp_error_keeps_its_code_and_job_id() -> None:
    h = Harness()
    h.send(env("job.subscribe", {"job_id": "job_9"}, id_="s1"))
    (req,) = h.requests
    from shared.errors import JobNotFound
    h.session.failed(req, JobNotFound("no job 'job_9'"))
    (f,) = h.drain()
    assert f["payload"]["code"] == "JOB_NOT_FOUND" and f["payload"]["job_id"] == "job_9"


def test_a_fault_inside_the_session_is_answered_and_the_connection_goes_on() -> None:
    """serve_connection answers INTERNAL_ERROR for a frame the session fails on unexpectedly,
    and keeps reading: the next frame is answered as usual."""
    import anyio

    from supervisor.server.connection import serve_connection

    class _Transport:
        def __init__(self, frames: list[bytes]) -> None:
            self.frames = frames
            self.sent: list[dict[str, Any]] = []
            self.closed: tuple[int, str] | None = None

        async def recv(self) -> bytes | None:
            await anyio.sleep(0.01)
            return self.frames.pop(0) if self.frames else None

        async def send_many(self, frames: list[bytes]) -> None:
            self.sent += [orjson.loads(f) for f in frames]

        async def close(self, code: int, reason: str) -> None:
            self.closed = (code, reason)

    h = Harness()
    real = h.session.receive
    calls = []

    def flaky(data: str | bytes, now: float) -> Any:
        calls.append(data)
        if len(calls) == 1:
            raise KeyError("a bug")
        return real(data, now)

    h.session.receive = flaky  # type: ignore[method-assign]

    class _Host:
        config = SimpleNamespace(tokens={}, heartbeat_interval=30)
        draining = False

        def open_session(self, *a: Any) -> Session:
            return h.session

        def session_detached(self, s: Session) -> None:
            pass

        def unfinished_jobs(self, owner_id: str | None = None) -> list[Any]:
            return []

    hello = orjson.dumps(env("session.hello", {"client": {"name": "t", "version": "1"}}, id_=ULID_ID))
    t = _Transport([hello, orjson.dumps(env("session.ping", {"nonce": "a"})),
                    orjson.dumps(env("session.ping", {"nonce": "b"}))])

    async def go() -> None:
        with anyio.fail_after(5):
            await serve_connection(_Host(), t, MiB)  # type: ignore[arg-type]
    asyncio.run(go())
    kinds = [(f["type"], f["payload"].get("code") or f["payload"].get("ping_nonce")) for f in t.sent]
    assert ("session.error", "INTERNAL_ERROR") in kinds and ("session.pong", "b") in kinds
