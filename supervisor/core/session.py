"""One ARCP session as a state machine: frames and the time in, frames and requests out.

The session does no I/O and reads no clock: the connection feeds it each inbound
frame with the current monotonic time (`receive`) and ticks it (`tick`) for
heartbeats; it answers session-level messages itself (ping, ack, close) and returns
the requests that concern jobs (supervisor/core/requests.py) for the runtime to
carry out. Frames it produces go into its Outbox, already serialised, with
`event_seq` stamped when sequenced; a sequenced frame to keep for resume goes to the
`keep` callable it was given (the store's enqueue; a list in tests). Closing the
transport is asked of the `close` callable of the transport attached.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from shared.envelope import Envelope, frame, parse_envelope, request_id_of
from shared.errors import ARCPError, HeartbeatLost, InternalError, InvalidRequest, Unauthenticated
from shared.ids import UUID_RE, new_id, new_resume_token, new_ulid, now_ts
from shared.messages import (
    CLIENT_TYPES, FEATURES, JOB_CANCEL, JOB_SUBMIT, JOB_SUBSCRIBE, JOB_UNSUBSCRIBE, SESSION_ACK, SESSION_BYE,
    SESSION_CLOSE, SESSION_HELLO, SESSION_LIST_JOBS, SESSION_PING, SESSION_PONG,
)
from supervisor import __version__
from supervisor.core.frames import GO, PY, session_error
from supervisor.core.outbox import HIGH_WATER_BYTES, Outbox
from supervisor.core.requests import Cancel, ListJobs, Request, Submit, Subscribe, Unsubscribe, job_id_of

log = logging.getLogger("arcp.session")
FLAVOUR_KEY = "x-vendor.arcp-supervisor.flavour"
MAX_ECHO = 128  # longest client value echoed back (ids are at most 128 characters)
MAX_MESSAGE = 4096
ANONYMOUS = "anonymous"
STALL_LIMIT = 60.0  # seconds a client may leave its queue at the high-water mark


class FrameTooLarge(Exception):
    pass


class Oversized(bytes):
    """What a transport hands over instead of an inbound frame past its size limit."""

    def __new__(cls, limit: int) -> Oversized:
        obj = super().__new__(cls, b"")
        obj.limit = limit
        return obj

    limit: int


def detect_flavour(hello: Envelope) -> str:
    """Go clients send UUID envelope ids; an explicit extension wins (§10.2)."""
    override = hello.extensions.get(FLAVOUR_KEY)
    if override in (GO, PY):
        return str(override)
    return GO if UUID_RE.match(hello.id) else PY


def authenticate(tokens: dict[str, str], hello: Envelope) -> str:
    """The principal for a hello; Unauthenticated when tokens are configured and it fails."""
    auth = hello.payload.get("auth")
    token = ""
    if isinstance(auth, dict):
        scheme = auth.get("scheme", "bearer")
        if scheme != "bearer":
            raise Unauthenticated("only the bearer auth scheme is supported")
        t = auth.get("token")
        token = t if isinstance(t, str) else ""
    if not tokens:
        return ANONYMOUS
    principal = None
    supplied = token.encode()
    for known, who in tokens.items():  # no early exit: constant time over the table
        if hmac.compare_digest(known.encode(), supplied):
            principal = who
    if principal is None:
        raise Unauthenticated("invalid bearer token")
    return principal


@dataclass(frozen=True)
class SessionSettings:
    """What a session needs of the server's configuration, fixed when it opens."""

    resume_window: float
    heartbeat_interval: float
    back_pressure_threshold: int
    log_bytes: int  # the session's frame log in the store, bounded in bytes
    frame_cap: int
    admin: bool = False  # an operator ([auth] admins): sees, follows and may cancel every principal's jobs


KeepFrame = Callable[[str, int, str, bytes], None]  # (session_id, seq, job_id, frame)
RelayFrame = Callable[[dict[str, Any], str, bool], None]  # (envelope without event_seq, job_id, logged)
CloseTransport = Callable[[int, str], None]


class Session:
    """A session outlives its transport: detached, it keeps its seq space and its frames
    stay in the store until a resume attaches a new transport or its window passes."""

    def __init__(self, settings: SessionSettings, principal: str, flavour: str, features: list[str],
                 keep: KeepFrame, close: CloseTransport, now: float, *, session_id: str | None = None,
                 seq: int = 0) -> None:
        """A new session, or (`session_id`, `seq`) one taken over from another node."""
        self.settings = settings
        self.id = session_id or new_id("sess")
        self.principal = principal
        self.admin = settings.admin
        self.flavour = flavour
        self.features = features
        self.resume_token = new_resume_token()
        self.frame_cap = settings.frame_cap
        # Past the high-water mark the session's own jobs wait; the hard limit leaves room for a
        # resume's replay of the whole log on top of that before the client counts as not reading.
        self.outbox = Outbox(hard_bytes=settings.log_bytes + 2 * HIGH_WATER_BYTES)
        self.outbox.on_overflow = self._overflow
        self.seq = seq
        self.last_ack = 0
        # Set once another node numbers this session's frames (it moved there, or it is another
        # node's session following a job here): frames go there, unnumbered (supervisor/cluster/).
        self.relay_to: RelayFrame | None = None
        self.closed = False  # the client said close/bye
        self.expired = False  # past its resume window: forgotten
        self.detached_at: float | None = None  # monotonic time the transport went away
        self.back_pressure_signalled = False
        self.last_inbound = now
        self.last_ping = 0.0
        self._keep = keep
        self._close = close

    # -- transport ------------------------------------------------------------
    def attach(self, close: CloseTransport, now: float) -> None:
        self._close = close
        self.detached_at = None
        self.last_inbound = now
        self.outbox.attach()

    def detach(self, now: float) -> None:
        self.detached_at = now
        self.outbox.detach()

    def close_transport(self, code: int, reason: str) -> None:
        self._close(code, reason)

    def _overflow(self, queued: int) -> None:
        """The client stopped reading while frames no job waits for piled up: its queue is
        dropped (the outbox did) and the transport closed; the session stays resumable."""
        log.warning("session %s: %d bytes queued for a client that does not read: closing its transport",
                    self.id, queued)
        self._close(1011, "consumer too slow")

    def drop_stalled(self) -> None:
        """A follower that keeps a job waiting (its queue at the high-water mark past the
        follower's grace): taken as not reading, like an overflow: its queue dropped, its
        transport closed; the session stays resumable from its log."""
        queued = self.outbox.queued_bytes
        self.outbox.detach()
        self._overflow(queued)

    def tick(self, now: float) -> None:
        """Time passes: end a transport whose client stopped reading or went silent (two
        heartbeat intervals without traffic, with the heartbeat feature); ping after one."""
        if self.detached_at is not None or self.expired:
            return
        if self.outbox.stalled_for(now) > STALL_LIMIT:
            self.error(InternalError("consumer too slow: the client stopped reading"))
            self.close_transport(1011, "consumer too slow")
            return
        if "heartbeat" not in self.features:
            return
        interval = self.settings.heartbeat_interval
        idle = now - self.last_inbound
        if idle >= 2 * interval:
            self.error(HeartbeatLost(f"no traffic from the client for {idle:.0f} s", retryable=True))
            self.close_transport(1001, "heartbeat lost")
        elif idle >= interval and now - self.last_ping >= interval:
            self.last_ping = now
            self.send(frame("session.ping", new_ulid(), {"nonce": new_id("p"), "sent_at": now_ts()},
                            session_id=self.id))

    # -- outbound -----------------------------------------------------------
    def encode(self, env: dict[str, Any]) -> bytes:
        data = orjson.dumps(env)
        if len(data) > self.frame_cap:
            raise FrameTooLarge(f"{env.get('type')} frame of {len(data)} bytes exceeds the {self.frame_cap}-byte cap")
        return data

    def send(self, env: dict[str, Any]) -> None:
        """Queue an unsequenced frame."""
        if self.relay_to is not None:
            self.relay_to(env, str(env.get("job_id") or ""), False)
            return
        self.outbox.put(self.encode(env))

    def send_seq(self, env: dict[str, Any], job_id: str, log: bool = True) -> int:
        """Stamp the next event_seq, keep it for resume (unless `log` is false), queue it;
        return the seq (0 for a session past its window). FrameTooLarge leaves the counter
        untouched."""
        if self.expired:
            return 0
        if self.relay_to is not None:
            self.encode(env)  # (FrameTooLarge here, as for a local session)
            self.relay_to(env, job_id, log)
            return self.seq
        env["event_seq"] = self.seq + 1
        data = self.encode(env)
        self.seq += 1
        if log:
            self._keep(self.id, self.seq, job_id, data)
        self.outbox.put(data)
        return self.seq

    def lag(self) -> int:
        """Sequenced frames sent and not yet acknowledged (with the ack feature)."""
        return self.seq - self.last_ack if "ack" in self.features else 0

    def error(self, err: ARCPError, request_id: str | None = None, job_id: str | None = None) -> None:
        """Answer with session.error; whatever a client echoes into it, it fits one frame."""
        if job_id is not None and len(job_id) > MAX_ECHO:
            job_id = None
        if len(err.message) > MAX_MESSAGE:
            err = type(err)(err.message[:MAX_MESSAGE] + "...", retryable=err.retryable)  # type: ignore[call-arg]
        try:
            self.send(session_error(err, session_id=self.id, request_id=request_id, job_id=job_id))
        except FrameTooLarge:
            self.send(session_error(type(err)(f"{err.code}: the error's details do not fit one frame"),  # type: ignore[call-arg]
                                    session_id=self.id, request_id=request_id))

    def failed(self, request: Request, exc: Exception) -> None:
        """A request the runtime could not carry out: answered, whatever went wrong. An
        ARCPError is the client's answer; anything else is a fault of ours, logged with its
        traceback and answered INTERNAL_ERROR, and the session goes on."""
        rid = request.env.id
        job_id = job_id_of(request)
        if isinstance(exc, ARCPError):
            self.error(exc, request_id=rid, job_id=job_id)
        elif isinstance(exc, FrameTooLarge):
            log.error("session %s: %s", self.id, exc)
            self.error(InvalidRequest(f"the reply does not fit one frame: {exc}"), request_id=rid)
        else:
            log.error("session %s: %s failed: %r", self.id, request.env.type, exc, exc_info=exc)
            self.error(InternalError(f"{request.env.type} failed inside the server: {type(exc).__name__}"),
                       request_id=rid, job_id=job_id)

    def welcome(self, agents: list[dict[str, Any]]) -> dict[str, Any]:
        return frame("session.welcome", new_ulid(), {
            "runtime": {"name": "arcp-supervisor", "version": __version__},
            "session_id": self.id,
            "resume_token": self.resume_token,
            "resume_window_sec": self.settings.resume_window,
            "heartbeat_interval_sec": self.settings.heartbeat_interval,
            "accepted_at": now_ts(),
            "capabilities": {"encodings": ["json"], "features": self.features, "agents": agents},
        }, session_id=self.id)

    # -- inbound ------------------------------------------------------------
    def receive(self, data: str | bytes, now: float) -> Request | None:
        """One inbound frame: answered here, or returned as a request for the runtime. No
        failure escapes: each is answered with session.error."""
        self.last_inbound = now
        if isinstance(data, Oversized):
            self.error(InvalidRequest(f"frame larger than the {data.limit}-byte limit; it was dropped"))
            return None
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            self.error(InvalidRequest(f"frame is not valid JSON: {e}"))
            return None
        rid = request_id_of(obj)
        try:
            env = parse_envelope(obj)
            return self._dispatch(env)
        except ARCPError as e:
            job_id = obj.get("job_id") if isinstance(obj, dict) and isinstance(obj.get("job_id"), str) else None
            self.error(e, request_id=rid, job_id=job_id)
        except FrameTooLarge as e:
            log.error("session %s: %s", self.id, e)
            self.error(InvalidRequest(f"the reply does not fit one frame: {e}"), request_id=rid)
        return None

    def _dispatch(self, env: Envelope) -> Request | None:
        t = env.type
        if t == JOB_SUBMIT:
            return Submit(env)
        if t == SESSION_PING:
            nonce = env.payload.get("nonce")
            if not isinstance(nonce, str):
                raise InvalidRequest("session.ping payload needs a string 'nonce'")
            self.send(frame("session.pong", new_ulid(), {"ping_nonce": nonce, "received_at": now_ts()},
                            session_id=self.id))
        elif t == SESSION_PONG:
            pass
        elif t == SESSION_ACK:
            self._ack(env)
        elif t == JOB_CANCEL:
            job_id = env.job_id or env.payload.get("job_id")
            if not isinstance(job_id, str) or not job_id:
                raise InvalidRequest("job.cancel needs the target job id in the envelope 'job_id'")
            reason = env.payload.get("reason")
            return Cancel(env, job_id, reason if isinstance(reason, str) and reason else "cancelled by client")
        elif t == SESSION_LIST_JOBS:
            self._require("list_jobs", t)
            return ListJobs(env)
        elif t in (JOB_SUBSCRIBE, JOB_UNSUBSCRIBE):
            self._require("subscribe", t)
            job_id = env.payload.get("job_id") or env.job_id
            if not isinstance(job_id, str) or not job_id:
                raise InvalidRequest(f"{t} needs a 'job_id'")
            return Subscribe(env, job_id) if t == JOB_SUBSCRIBE else Unsubscribe(env, job_id)
        elif t in (SESSION_CLOSE, SESSION_BYE):
            reason = env.payload.get("reason")
            self.send(frame("session.closed", new_ulid(),
                            {"reason": reason if isinstance(reason, str) else "closed"}, session_id=self.id))
            self.closed = True
            self._close(1000, "bye")
        elif t == SESSION_HELLO:
            raise InvalidRequest("session.hello already sent on this session")
        elif t in CLIENT_TYPES:  # pragma: no cover - every client type is handled above
            raise InvalidRequest(f"message type {t!r} is not handled")
        else:
            raise InvalidRequest(f"unknown envelope type {t[:MAX_ECHO]!r}")
        return None

    def _ack(self, env: Envelope) -> None:
        seq = env.payload.get("last_processed_seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise InvalidRequest("session.ack needs 'last_processed_seq', an integer >= 0")
        if seq > self.seq:
            raise InvalidRequest(f"session.ack of seq {seq}, beyond the last sent ({self.seq})")
        if "ack" in self.features:
            self.last_ack = max(self.last_ack, seq)
            if self.seq - self.last_ack < self.settings.back_pressure_threshold:
                self.back_pressure_signalled = False

    def _require(self, feature: str, t: str) -> None:
        if feature not in self.features:
            raise InvalidRequest(f"{t} needs the {feature!r} feature, which this session did not negotiate")


def negotiate(hello: Envelope, supported: tuple[str, ...] = FEATURES) -> list[str]:
    """The features both sides have (the welcome advertises the intersection)."""
    caps = hello.payload.get("capabilities")
    asked = caps.get("features") if isinstance(caps, dict) else None
    if not isinstance(asked, list):
        return []
    wanted = {f for f in asked if isinstance(f, str)}
    return [f for f in supported if f in wanted]


def check_hello(obj: Any) -> Envelope:
    env = parse_envelope(obj)
    if env.type != SESSION_HELLO:
        raise InvalidRequest(f"the first frame must be session.hello, not {env.type!r}")
    client = env.payload.get("client")
    if client is not None and not isinstance(client, dict):
        raise InvalidRequest("session.hello field 'client' must be an object")
    return env
