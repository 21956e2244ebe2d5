"""A frame the state store refuses to keep (its queue is full: the database has been away too
long) is still sent, and the session's client is told once, with a retryable error, that a
resume may miss what follows; once the store keeps frames again, it is told again next time."""

from __future__ import annotations

from typing import Any

from shared.envelope import frame
from shared.ids import new_ulid
from supervisor.config import Config
from supervisor.core.jobs import JobTable
from supervisor.server.sessions import SessionTable
from supervisor.state.base import StoreError
from tests.unit.test_session import hello


class RefusingStore:
    def __init__(self) -> None:
        self.refuse = False
        self.logged: list[int] = []

    def log_frame(self, session_id: str, seq: int, job_id: str, data: bytes) -> None:
        if self.refuse:
            raise StoreError(f"log_frame session={session_id} seq={seq} refused: the state store's queue is full")
        self.logged.append(seq)


def _sent(s: Any) -> list[dict[str, Any]]:
    import orjson

    return [orjson.loads(b) for b in s.outbox._queue]


def test_a_refused_frame_is_sent_and_the_client_told_once() -> None:
    store = RefusingStore()
    table = SessionTable(lambda: Config(), store, JobTable(10, 60), None, ("ack",), lambda: [])  # type: ignore[arg-type]
    s = table.open(hello(), "alice", 1 << 20, lambda code, reason: None)

    def event(i: int) -> None:
        s.send_seq(frame("job.event", new_ulid(), {"kind": "log", "ts": "2026-01-01T00:00:00Z", "body": {"i": i}},
                         session_id=s.id, job_id="job_1"), "job_1")

    event(1)
    store.refuse = True
    event(2)
    event(3)
    store.refuse = False
    event(4)
    store.refuse = True
    event(5)
    sent = _sent(s)
    assert [f["event_seq"] for f in sent if f["type"] == "job.event"] == [1, 2, 3, 4, 5]  # nothing dropped
    errors = [f["payload"] for f in sent if f["type"] == "session.error"]
    assert [(e["code"], e["retryable"], e["details"]) for e in errors] == [
        ("INTERNAL_ERROR", True, {"reason": "state store full", "event_seq": 2}),
        ("INTERNAL_ERROR", True, {"reason": "state store full", "event_seq": 5})]
    assert store.logged == [1, 4]
