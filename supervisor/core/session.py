"""One ARCP session: handshake, request dispatch and outbound stamping.

The session does no I/O: frames it produces go into its Outbox (already
serialised, with `event_seq` stamped when sequenced); jobs are submitted to
and cancelled through the Runtime it is given.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson

from shared.envelope import Envelope, frame, parse_envelope, request_id_of
from shared.errors import ARCPError, InvalidRequest, JobNotFound, PermissionDenied, Unauthenticated
from shared.ids import UUID_RE, new_id, new_resume_token, new_ulid, now_ts
from shared.messages import CLIENT_TYPES, FEATURES
from supervisor import __version__
from supervisor.core.frames import GO, PY, session_error
from supervisor.core.outbox import HIGH_WATER_BYTES, Outbox
from supervisor.state.store import DEFAULT_LOG_BYTES

if TYPE_CHECKING:
    from supervisor.runtime import Runtime

log = logging.getLogger("arcp.session")
FLAVOUR_KEY = "x-vendor.arcp-supervisor.flavour"
MAX_ECHO = 128  # longest client value echoed back (ids are at most 128 characters)
MAX_MESSAGE = 4096
ANONYMOUS = "anonymous"


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


class Session:
    """A session outlives its transport: detached, it keeps its seq space and logs its
    frames in the store until a resume attaches a new transport or its window passes."""

    def __init__(self, runtime: Runtime, principal: str, flavour: str, features: list[str],
                 frame_cap: int, close: Callable[[int, str], None]) -> None:
        self.runtime = runtime
        self.id = new_id("sess")
        self.principal = principal
        # An operator ([auth] admins, as configured when the session opened): sees, follows and
        # may cancel every principal's jobs.
        self.admin = principal in getattr(runtime.config, "admins", ())
        self.flavour = flavour
        self.features = features
        self.resume_token = new_resume_token()
        self.frame_cap = frame_cap
        # Past the high-water mark the session's own jobs wait; the hard limit leaves room for a
        # resume's replay of the whole log on top of that before the client counts as not reading.
        log_bytes = getattr(runtime.config, "session_log_bytes", DEFAULT_LOG_BYTES)
        self.outbox = Outbox(hard_bytes=log_bytes + 2 * HIGH_WATER_BYTES)
        self.outbox.on_overflow = self._overflow
        self.seq = 0
        self.last_ack = 0
        self.closed = False  # the client said close/bye
        self.expired = False  # past its resume window: forgotten
        self.detached_at: float | None = None  # monotonic time the transport went away
        self.back_pressure_signalled = False
        self.last_inbound = [time.monotonic()]  # shared with the connection that reads
        self.last_ping = 0.0
        self._close = close

    def attach(self, close: Callable[[int, str], None]) -> None:
        self._close = close
        self.detached_at = None
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

    # -- outbound -----------------------------------------------------------
    def encode(self, env: dict[str, Any]) -> bytes:
        data = orjson.dumps(env)
        if len(data) > self.frame_cap:
            raise FrameTooLarge(f"{env.get('type')} frame of {len(data)} bytes exceeds the {self.frame_cap}-byte cap")
        return data

    def send(self, env: dict[str, Any]) -> None:
        """Queue an unsequenced frame."""
        self.outbox.put(self.encode(env))

    def send_seq(self, env: dict[str, Any], job_id: str, log: bool = True) -> int:
        """Stamp the next event_seq, log for resume, queue; return the seq.

        FrameTooLarge leaves the counter untouched.
        """
        if self.expired:
            return 0
        env["event_seq"] = self.seq + 1
        data = self.encode(env)
        self.seq += 1
        if log:
            self.runtime.store.log_frame(self.id, self.seq, job_id, data)
        self.outbox.put(data)
        return self.seq

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

    def welcome(self) -> dict[str, Any]:
        return frame("session.welcome", new_ulid(), {
            "runtime": {"name": "arcp-supervisor", "version": __version__},
            "session_id": self.id,
            "resume_token": self.resume_token,
            "resume_window_sec": self.runtime.config.resume_window,
            "heartbeat_interval_sec": self.runtime.config.heartbeat_interval,
            "accepted_at": now_ts(),
            "capabilities": {"encodings": ["json"], "features": self.features,
                             "agents": self.runtime.registry.inventory()},
        }, session_id=self.id)

    # -- inbound ------------------------------------------------------------
    def receive(self, data: str | bytes) -> None:
        """One inbound frame; every failure is answered, none escapes."""
        if isinstance(data, Oversized):
            self.error(InvalidRequest(f"frame larger than the {data.limit}-byte limit; it was dropped"))
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            self.error(InvalidRequest(f"frame is not valid JSON: {e}"))
            return
        rid = request_id_of(obj)
        try:
            env = parse_envelope(obj)
            self.dispatch(env)
        except ARCPError as e:
            job_id = obj.get("job_id") if isinstance(obj, dict) and isinstance(obj.get("job_id"), str) else None
            self.error(e, request_id=rid, job_id=job_id)
        except FrameTooLarge as e:
            log.error("session %s: %s", self.id, e)
            self.error(InvalidRequest(f"the reply does not fit one frame: {e}"), request_id=rid)

    def dispatch(self, env: Envelope) -> None:
        t = env.type
        if t == "job.submit":
            self.runtime.submit(self, env)
        elif t == "session.ping":
            nonce = env.payload.get("nonce")
            if not isinstance(nonce, str):
                raise InvalidRequest("session.ping payload needs a string 'nonce'")
            self.send(frame("session.pong", new_ulid(), {"ping_nonce": nonce, "received_at": now_ts()},
                            session_id=self.id))
        elif t == "session.pong":
            pass
        elif t == "session.ack":
            seq = env.payload.get("last_processed_seq")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise InvalidRequest("session.ack needs 'last_processed_seq', an integer >= 0")
            if seq > self.seq:
                raise InvalidRequest(f"session.ack of seq {seq}, beyond the last sent ({self.seq})")
            if "ack" in self.features:
                self.last_ack = max(self.last_ack, seq)
                if self.seq - self.last_ack < self.runtime.back_pressure_threshold:
                    self.back_pressure_signalled = False
        elif t == "job.cancel":
            self._cancel(env)
        elif t == "session.list_jobs":
            self._require("list_jobs", t)
            self.send(self.runtime.list_jobs(self, env))
        elif t in ("job.subscribe", "job.unsubscribe"):
            self._require("subscribe", t)
            job_id = env.payload.get("job_id") or env.job_id
            if not isinstance(job_id, str) or not job_id:
                raise InvalidRequest(f"{t} needs a 'job_id'")
            if t == "job.subscribe":
                self.runtime.subscribe(self, env, job_id)
            else:
                self.runtime.unsubscribe(self, job_id)
        elif t in ("session.close", "session.bye"):
            reason = env.payload.get("reason")
            self.send(frame("session.closed", new_ulid(),
                            {"reason": reason if isinstance(reason, str) else "closed"}, session_id=self.id))
            self.closed = True
            self._close(1000, "bye")
        elif t == "session.hello":
            raise InvalidRequest("session.hello already sent on this session")
        elif t in CLIENT_TYPES:  # pragma: no cover - every client type is handled above
            raise InvalidRequest(f"message type {t!r} is not handled")
        else:
            raise InvalidRequest(f"unknown envelope type {t[:MAX_ECHO]!r}")

    def _require(self, feature: str, t: str) -> None:
        if feature not in self.features:
            raise InvalidRequest(f"{t} needs the {feature!r} feature, which this session did not negotiate")

    def _cancel(self, env: Envelope) -> None:
        job_id = env.job_id or env.payload.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise InvalidRequest("job.cancel needs the target job id in the envelope 'job_id'")
        reason = env.payload.get("reason")
        reason = reason if isinstance(reason, str) and reason else "cancelled by client"
        job = self.runtime.jobs.jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id[:MAX_ECHO]!r}")
        if self.admin and (job.principal != self.principal or job.owner_id != self.id):
            if not job.done:
                log.info("session %s (admin %s) cancels job %s of %s", self.id, self.principal, job_id,
                         job.principal)
                job.runner.request_stop("cancel", reason)
            return
        if job.principal != self.principal or job.owner_id != self.id:
            if self.flavour == GO:
                raise PermissionDenied(f"only the submitting session may cancel job {job_id[:MAX_ECHO]!r}")
            log.info("session %s: cancel of %s refused (not the submitter)", self.id, job_id)
            return
        if job.done:
            return  # a finished job: silent no-op
        job.runner.request_stop("cancel", reason)


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
    if env.type != "session.hello":
        raise InvalidRequest(f"the first frame must be session.hello, not {env.type!r}")
    client = env.payload.get("client")
    if client is not None and not isinstance(client, dict):
        raise InvalidRequest("session.hello field 'client' must be an object")
    return env
