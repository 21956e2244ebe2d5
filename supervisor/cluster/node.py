"""This process as one node of several sharing a PostgreSQL state database (contract.md,
"Several machines"): the event loop's side of supervisor/state/postgres_cluster.py.

What moves between nodes, and how:
- A session is numbered by one node at a time: the one its client is attached to, or was last.
  A resume that reaches another node takes it over: from its node, if that one is alive, by a
  handover command (that node stops numbering, relays what its jobs send from then on, and
  answers with the session's seq once its frames are logged); from the database, if its node
  was lost (the seq is the newest logged or seen by the client).
- A job runs where it was accepted. Its frames for a session numbered elsewhere (its owner
  moved, or another node's session follows it) go by relay, in order; the session's node
  numbers and logs them as if the job ran there.
- A cancel, subscribe or unsubscribe of a job running on another node is a command to that node;
  a finished job's record, terminal and history are read from the database by any node.
- Listing reads every node's jobs from the database, with this node's own in memory.
- A node whose heartbeat stops is declared lost by another one; its jobs' terminals (INTERNAL_ERROR,
  retryable, {"reason": "node lost"}) are relayed to their sessions. A node that finds itself
  declared lost is fenced: `fenced` is set and the server stops.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import anyio
import orjson

from shared.envelope import Envelope, frame
from shared.errors import (
    ARCPError, InternalError, InvalidRequest, JobNotFound, PermissionDenied, ResumeWindowExpired, Unauthenticated,
)
from shared.ids import new_ulid
from supervisor.config import Config
from supervisor.core.frames import GO
from supervisor.core.jobs import Job, JobTable, Watch
from supervisor.core.requests import Cancel
from supervisor.core.session import Session, SessionSettings
from supervisor.jobs.delivery import Delivery
from supervisor.state.base import StoredJob
from supervisor.state.postgres import PostgresStore
from supervisor.state.postgres_cluster import COMMAND_CHANNEL, RELAY_CHANNEL, token_hash
from supervisor.state.postgres_listen import RECONNECTED

log = logging.getLogger("arcp.cluster")
HANDOVER_TIMEOUT = 2.0  # seconds a resume waits for the session's node to hand it over (clients wait 5 s)
HANDOVER_POLL = 0.25  # ... looking at the session's row meanwhile (a lost announcement)
SEQUENCED = frozenset(("job.event", "job.result", "job.error", "job.cancelled"))
TERMINALS = frozenset(("job.result", "job.error"))
RELAY_BATCH = 256  # relayed frames read at once for a session (the rest wait in the database)
ENDED_KEPT = 4096  # jobs whose terminal a session got by relay, remembered to drop what follows

Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], bool]
RestoreJob = Callable[[StoredJob], Job]


class Cluster:
    def __init__(self, store: PostgresStore, config: Callable[[], Config], sessions: dict[str, Session],
                 jobs: JobTable, delivery: Delivery, spawn: Spawn, restore: RestoreJob) -> None:
        self.store = store
        self.node_id = store.node_id
        self._config = config
        self.sessions = sessions  # this node's sessions (the session table's)
        self.jobs = jobs
        self.delivery = delivery
        self._spawn = spawn
        self._restore = restore
        self.fenced = anyio.Event()
        self.fenced_by: str | None = None
        self._answers: dict[str, dict[str, Any]] = {}  # handover answers, by request ref
        self._awaited: set[str] = set()  # the refs of handovers being waited for
        self._answered = anyio.Event()
        self._draining: set[str] = set()
        self._again: set[str] = set()
        self._ended: dict[str, set[str]] = {}  # session -> jobs whose terminal it got by relay
        self._followers: dict[str, Session] = {}  # other nodes' sessions following jobs here
        self._taking = False  # reading this node's commands
        self._take_again = False

    def start(self) -> None:
        self.store.listen(self.notified, self._fence)
        self._spawn(self.take_commands)  # any sent while this node id was away

    def _fence(self, by: str) -> None:
        self.fenced_by = by
        self.fenced.set()

    # -- the session table's directory (supervisor/server/sessions.py) -----------------------
    def opened(self, s: Session) -> None:
        """Opened or resumed here, attached: this node numbers it, with this token."""
        self.store.put_session(s.id, s.principal, s.resume_token, s.seq, detached=False, closed=s.closed,
                               flavour=s.flavour)

    def detached(self, s: Session) -> None:
        self.store.put_session(s.id, s.principal, s.resume_token, s.seq, detached=True, closed=s.closed,
                               flavour=s.flavour)

    def expired(self, s: Session) -> None:
        self.store.drop_session(s.id)
        self._ended.pop(s.id, None)

    async def take(self, sid: str, token: str, last: int, principal: str) -> tuple[int, str]:
        """A session another node numbered, taken over for a resume here: its seq and flavour.
        ResumeWindowExpired, Unauthenticated or InvalidRequest as for a local resume."""
        row = await self.store.session_row(sid)
        if row is None:
            raise ResumeWindowExpired(f"no resumable session {sid!r}")
        window = self._config().resume_window
        if row["detached_for"] is not None and row["detached_for"] > window:
            raise ResumeWindowExpired(f"the resume window of session {sid!r} has passed")
        if not hmac.compare_digest(token_hash(token), row["token_hash"]) or principal != row["principal"]:
            raise Unauthenticated("resume token or principal does not match the session")
        if row["closed"] and not row["running_jobs"]:
            raise ResumeWindowExpired(f"session {sid!r} was closed and has no running jobs")
        node = row["node_id"]
        alive = row["node_alive"] and node != self.node_id and not await self.store.node_gone(node)
        if alive:
            answer = await self._handover(sid, node)
            if answer.get("ok"):
                seq = int(answer["seq"])
                if last > seq:
                    raise InvalidRequest(f"resume 'last_event_seq' {last} is beyond the session's last seq {seq}")
                return seq, row["flavour"]
            if not answer.get("unknown"):
                raise ResumeWindowExpired(f"no resumable session {sid!r}: {answer.get('why', 'refused')}")
        # Its node is lost (or holds no such session any more): taken from the database; the
        # client may have seen frames its node numbered and did not log before it was lost.
        if node != self.node_id and not await self.store.take_session(sid, node):
            raise ResumeWindowExpired(f"session {sid!r} was taken over by another process meanwhile")
        log.info("session %s taken over from node %s (%s)", sid, node,
                 "this node" if node == self.node_id else "lost" if not alive else "it had no such session")
        return max(row["seq"], row["logged_seq"], last), row["flavour"]

    async def _handover(self, sid: str, node: str) -> dict[str, Any]:
        ref = new_ulid()
        self._awaited.add(ref)
        try:
            return await self._await_handover(sid, node, ref)
        finally:
            self._awaited.discard(ref)
            self._answers.pop(ref, None)

    async def _await_handover(self, sid: str, node: str, ref: str) -> dict[str, Any]:
        self.store.command({"op": "handover", "to": node, "from": self.node_id, "session": sid, "ref": ref})
        deadline = time.monotonic() + HANDOVER_TIMEOUT
        while time.monotonic() < deadline:
            if ref in self._answers:
                return self._answers.pop(ref)
            answered = self._answered
            with anyio.move_on_after(HANDOVER_POLL):
                await answered.wait()
            if ref not in self._answers:  # the answer's announcement may be lost: the row says it too
                row = await self.store.session_row(sid)
                if row is not None and row["node_id"] == self.node_id:
                    return {"ok": True, "seq": row["seq"]}
        if await self.store.node_gone(node):
            return {"ok": False, "unknown": True}  # (taken from the database by the caller)
        raise InternalError(f"the process holding session {sid!r} ({node}) did not hand it over within "
                            f"{HANDOVER_TIMEOUT:g} s", retryable=True)

    def adopted(self, s: Session) -> None:
        """A session taken over here is attached: what was relayed to it meanwhile follows."""
        self._spawn(lambda: self.drain(s.id))

    # -- announcements ---------------------------------------------------------------------
    def notified(self, channel: str, payload: str) -> None:
        if channel == RELAY_CHANNEL:
            if payload in self.sessions:
                self._spawn(lambda: self.drain(payload))
        elif channel == COMMAND_CHANNEL:
            if payload == self.node_id:
                self._spawn(self.take_commands)
        elif channel == RECONNECTED:  # announcements may have been missed: read again
            for sid in list(self.sessions):
                self._spawn(lambda sid=sid: self.drain(sid))  # type: ignore[misc]
            self._spawn(self.take_commands)

    async def take_commands(self) -> None:
        """Run the commands sent to this node, oldest first (one reader at a time; an
        announcement meanwhile makes it read again)."""
        if self._taking:
            self._take_again = True
            return
        self._taking = True
        try:
            while True:
                self._take_again = False
                bodies = await self.store.take_commands()
                for body in bodies:
                    try:
                        msg = orjson.loads(body)
                    except orjson.JSONDecodeError:
                        log.warning("a command that is not JSON: %.200r", body)
                        continue
                    if isinstance(msg, dict):
                        self._command(msg)
                if not bodies and not self._take_again:
                    return
        finally:
            self._taking = False

    def _command(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "handover":
                self._hand_over(str(msg["session"]), str(msg["from"]), str(msg["ref"]))
            elif op == "handed":
                if str(msg["ref"]) not in self._awaited:
                    return  # (an answer that came after its resume gave up)
                self._answers[str(msg["ref"])] = msg
                answered, self._answered = self._answered, anyio.Event()
                answered.set()
            elif op == "cancel":
                job = self.jobs.jobs.get(str(msg["job"]))
                if job is not None and not job.done and job.runner is not None:
                    log.info("job %s cancelled through node %s by session %s", job.id, msg.get("from"),
                             msg.get("by"))
                    job.runner.request_stop("cancel", msg.get("reason"))
            elif op == "subscribe":
                self._spawn(lambda: self._subscribe_here(msg))
            elif op == "unsubscribe":
                follower = self._followers.get(str(msg["session"]))
                if follower is not None:
                    self.delivery.unsubscribe(follower, str(msg["job"]))
            else:
                log.warning("unknown command %r from node %s", op, msg.get("from"))
        except (KeyError, TypeError, ValueError) as e:
            log.warning("malformed command %r from node %s: %r", op, msg.get("from"), e)

    def _hand_over(self, sid: str, to: str, ref: str) -> None:
        """Another node resumes one of this node's sessions: this node stops numbering it, and
        relays its jobs' frames there from now on; the answer follows the session's frames
        logged so far (one queue), with its seq."""
        s = self.sessions.get(sid)
        answer: dict[str, Any] = {"op": "handed", "to": to, "from": self.node_id, "ref": ref, "session": sid}
        if s is None or s.expired:
            answer.update(ok=False, unknown=True, why="no such session on its node")
        elif s.detached_at is None:
            answer.update(ok=False, why="it is live on another transport")
        else:
            del self.sessions[sid]
            self._ended.pop(sid, None)
            s.relay_to = self._relay_for(sid)
            self.store.put_session(sid, s.principal, s.resume_token, s.seq, detached=True, closed=s.closed,
                                   flavour=s.flavour, node_id=to)
            answer.update(ok=True, seq=s.seq)
            log.info("session %s handed over to node %s at seq %d", sid, to, s.seq)
        self.store.command(answer)

    def _relay_for(self, sid: str) -> Callable[[dict[str, Any], str, bool], None]:
        store = self.store

        def relay(env: dict[str, Any], job_id: str, logged: bool) -> None:
            store.relay(sid, job_id, env, logged=logged)
        return relay

    # -- frames relayed to this node's sessions ------------------------------------------------
    async def drain(self, sid: str) -> None:
        """Number and send what was relayed to a session of this node, oldest first (one drain
        of a session at a time; an announcement during it makes it read again)."""
        if sid in self._draining:
            self._again.add(sid)
            return
        self._draining.add(sid)
        try:
            while True:
                self._again.discard(sid)
                s = self.sessions.get(sid)
                if s is None:
                    return
                rows = await self.store.take_relay(sid, RELAY_BATCH)
                for job_id, kind, body, logged in rows:
                    self._deliver(s, job_id, kind, body, logged)
                if len(rows) == RELAY_BATCH:  # more waiting: in the database, until the client reads
                    self._again.add(sid)
                    await s.outbox.wait_writable()
                if sid not in self._again:
                    return
        finally:
            self._draining.discard(sid)

    def _deliver(self, s: Session, job_id: str, kind: str, body: bytes, logged: bool) -> None:
        ended = self._ended.setdefault(s.id, set())
        if job_id in ended:
            return  # after its terminal (a node declared lost that still ran it): dropped
        try:
            if kind == "terminal":
                d = orjson.loads(body)
                t, trace_id = d["terminal"], d.get("trace_id") or ""
                local = self.jobs.jobs.get(job_id)
                if local is not None and local.terminal is None and local.runner is None:
                    local.terminal, local.status = t, t["status"]
                self.delivery.send_outcome(s, job_id, trace_id, t, log=True)
                self._ended_now(ended, job_id)
                return
            env = orjson.loads(body)
            type_ = env.get("type")
            payload = env.get("payload") or {}
            if type_ == "job.event" and payload.get("kind") == "progress" and "progress" not in s.features:
                return
            env["session_id"] = s.id
            if type_ in SEQUENCED:
                env.pop("event_seq", None)
                s.send_seq(env, job_id, log=logged)
                if type_ in TERMINALS:
                    self._ended_now(ended, job_id)
            else:
                if type_ == "job.subscribed":
                    payload["subscribed_from"] = s.seq
                s.send(env)
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as e:
            log.error("session %s: a relayed %s frame of job %s is malformed (%r): dropped", s.id, kind, job_id, e)
        except ARCPError as e:  # (a frame too large for this session's transport)
            log.error("session %s: a relayed frame of job %s cannot be sent: %s", s.id, job_id, e)

    @staticmethod
    def _ended_now(ended: set[str], job_id: str) -> None:
        if len(ended) >= ENDED_KEPT:
            ended.clear()
        ended.add(job_id)

    # -- jobs of other nodes -------------------------------------------------------------------
    def followed(self, session: Session, job: Job) -> None:
        """A session subscribed to a job running here: recorded, so that if this node is lost,
        the job's terminal still reaches the session wherever it resumes."""
        if not job.done and session.id != job.owner_id:
            self.store.follow(job.id, session.id)

    def unfollowed(self, session: Session, job_id: str) -> None:
        self.store.follow(job_id, session.id, follows=False)

    async def remote_job(self, job_id: str) -> tuple[Job, str] | None:
        """A job this node does not have in memory: its record from the database (a finished one
        is kept here from now on, like a restored one) and the node that runs or ran it."""
        row = await self.store.job_row(job_id)
        if row is None:
            return None
        stored, node = row
        job = self._restore(stored)
        if job.done and job_id not in self.jobs.jobs:
            self.jobs.add(job)
        return job, node

    async def cancel(self, session: Session, req: Cancel) -> None:
        found = await self.remote_job(req.job_id)
        if found is None:
            raise JobNotFound(f"no job {req.job_id[:128]!r}")
        job, node = found
        own = job.principal == session.principal and job.owner_id == session.id
        if not own and not session.admin:
            if session.flavour == GO:
                raise PermissionDenied(f"only the submitting session may cancel job {req.job_id[:128]!r}")
            log.info("session %s: cancel of %s refused (not the submitter)", session.id, job.id)
            return
        if job.done:
            return
        self.store.command({"op": "cancel", "to": node, "from": self.node_id, "job": job.id, "reason": req.reason,
                            "by": session.id})

    async def subscribe(self, session: Session, env: Envelope, job_id: str) -> None:
        found = await self.remote_job(job_id)
        if found is None:
            raise JobNotFound(f"no job {job_id[:128]!r}")
        job, node = found
        if job.principal != session.principal and not session.admin:
            log.info("subscribe refused: %s (%s) to %s of %s", session.id, session.principal, job_id, job.principal)
            raise PermissionDenied(f"job {job_id[:128]!r} belongs to another principal")
        if job.done:  # its record, history and terminal are in the database: answered here
            await self.delivery.subscribe(session, env, job_id)
            return
        self.store.follow(job_id, session.id)
        self.store.command({"op": "subscribe", "to": node, "from": self.node_id, "job": job_id,
                            "session": session.id, "principal": session.principal, "admin": session.admin,
                            "flavour": session.flavour, "features": session.features,
                            "request_id": env.id, "payload": env.payload})

    async def unsubscribe(self, session: Session, job_id: str) -> None:
        """The job is not here: the node running it drops this session's subscription."""
        row = await self.store.job_row(job_id)
        self.store.follow(job_id, session.id, follows=False)
        if row is not None and row[0].terminal is None:
            self.store.command({"op": "unsubscribe", "to": row[1], "from": self.node_id, "job": job_id,
                                "session": session.id})

    async def replay_held(self, session: Session, env: Envelope, held: StoredJob) -> None:
        """A submit whose idempotency key another process's job holds: that job's job.accepted
        again, then its terminal if it has one, else the session follows it (as for a key held
        here: protocol.md §11.7)."""
        job = self._restore(held)
        if job.done:
            if job.id not in self.jobs.jobs:
                self.jobs.add(job)
            await self.delivery.replay_accept(session, env.id, self.jobs.jobs.get(job.id, job))
            return
        row = await self.store.job_row(job.id)
        session.send(frame("job.accepted", new_ulid(), job.accepted_payload(session.flavour, env.id),
                           session_id=session.id, job_id=job.id, trace_id=job.trace_id,
                           extensions=job.accepted_extensions()))
        if row is not None and session.id != job.owner_id:
            self.store.follow(job.id, session.id)
            self.store.command({"op": "subscribe", "to": row[1], "from": self.node_id, "job": job.id,
                                "session": session.id, "principal": session.principal, "admin": session.admin,
                                "flavour": session.flavour, "features": session.features,
                                "request_id": env.id, "payload": {"history": False}, "quiet": True})

    async def _subscribe_here(self, msg: dict[str, Any]) -> None:
        """Another node's session subscribes to a job running here: it follows the job like a
        local one, its frames relayed to it (`quiet`: an idempotent replay's follow, without a
        job.subscribed)."""
        sid = str(msg["session"])
        follower = self._followers.get(sid)
        if follower is None:
            settings = SessionSettings(resume_window=0, heartbeat_interval=0, back_pressure_threshold=0,
                                       log_bytes=0, frame_cap=self.delivery.frame_cap, admin=bool(msg.get("admin")))
            follower = Session(settings, str(msg["principal"]), str(msg.get("flavour") or ""),
                               [str(f) for f in msg.get("features") or []], _keep_nothing, _close_nothing,
                               time.monotonic(), session_id=sid)
            follower.outbox.detach()
            follower.relay_to = self._relay_for(sid)
            self._followers[sid] = follower
        job_id = str(msg["job"])
        if msg.get("quiet"):
            job = self.jobs.jobs.get(job_id)
            if job is not None and job.terminal is None and not any(w.session is follower for w in job.watchers):
                job.watchers.append(Watch(follower))
            elif job is not None and job.terminal is not None:
                self.delivery.send_terminal(follower, job, await self.delivery.terminal_of(job), log=True)
            return
        env = Envelope(type="job.subscribe", id=str(msg["request_id"]), payload=dict(msg.get("payload") or {}),
                       job_id=job_id)
        try:
            await self.delivery.subscribe(follower, env, str(msg["job"]))
        except ARCPError as e:
            follower.error(e, request_id=env.id, job_id=str(msg["job"]))
        self._forget_idle_followers()

    def _forget_idle_followers(self) -> None:
        following = {w.session.id for j in self.jobs.jobs.values() if not j.done for w in j.watchers}
        for sid in [sid for sid in self._followers if sid not in following]:
            del self._followers[sid]

    async def all_jobs(self, session: Session) -> Iterable[Job]:
        """Every node's jobs this session may see: this node's from memory, the others' from the
        database (as they were last written there)."""
        rows = await self.store.jobs_of(None if session.admin else session.principal)
        local = self.jobs.jobs
        merged = dict(local)
        for stored, _node in rows:
            if stored.job_id not in merged:
                merged[stored.job_id] = self._restore(stored)
        return merged.values()


def _keep_nothing(session_id: str, seq: int, job_id: str, data: bytes) -> None:
    return None


def _close_nothing(code: int, reason: str) -> None:
    return None
