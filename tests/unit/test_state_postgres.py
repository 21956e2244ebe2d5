"""supervisor/state/postgres.py: the StateStore contract run on both stores (SQLite on disk and
PostgreSQL, from one `Maker` per store), then what is PostgreSQL's own: the schema and its
version, several stores (nodes) on one database, idempotency keys claimed by racing stores,
and a server restart while writes are queued. The PostgreSQL server is tests/postgres.py's,
from the host's binaries (the tests fail without them, naming the package to install)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from supervisor.state.base import HIGH_WATER_BYTES, LOW_WATER_BYTES, RESTART_MESSAGE, StoreError
from supervisor.state.postgres import SCHEMA_VERSION, PostgresStore
from supervisor.state.queued import QueuedStore
from supervisor.state.sqlite import SqliteStore
from tests.postgres import PgServer, pg_server, pg_url  # noqa: F401 (fixtures)

MiB = 1024 * 1024
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


def _insert(store: QueuedStore, job_id: str, session: str = "s1", idem: str | None = None,
            principal: str = "alice") -> None:
    store.insert_job(job_id, principal, session, "echo@1.0.0", "running", "2025-01-01T00:00:00.000000Z",
                     "trace-" + job_id, idem, b"fp" if idem else None, {"input": {"n": 1}, "job": job_id})


async def _claim(store: QueuedStore, job_id: str, key: str) -> Any:
    return await store.claim_job(job_id, "alice", "s1", "echo@1.0.0", "running", "2025-01-01T00:00:00.000000Z",
                                 "trace-" + job_id, key, b"fp-" + job_id.encode(), {"job": job_id})


def _log(store: QueuedStore, session: str, first: int, n: int, size: int, job: str = "job_a") -> None:
    for seq in range(first, first + n):
        store.log_frame(session, seq, job, b"%d:" % seq + b"x" * size)


async def _logged_bytes(store: QueuedStore, session: str) -> int:
    return sum(len(f) for _, f in await store.frames_since(session, 0))


class Maker:
    """Opens stores on one database of one kind, and changes it behind their back."""

    kind = ""

    def open(self, **options: Any) -> QueuedStore:
        raise NotImplementedError

    def refuse_job_bad(self) -> None:
        """Make the database refuse job_bad's row and its frames (as a bad write would be)."""
        raise NotImplementedError


class SqliteMaker(Maker):
    kind = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        self.dir = str(tmp_path / "state")

    def open(self, **options: Any) -> QueuedStore:
        log_bytes = options.pop("session_log_bytes", 64 * MiB)
        return SqliteStore(self.dir, log_bytes, **options)

    def refuse_job_bad(self) -> None:
        side = sqlite3.connect(str(Path(self.dir) / "arcp-supervisor.sqlite3"), isolation_level=None)
        side.executescript("""
            CREATE TRIGGER refuse_frame BEFORE INSERT ON frames WHEN NEW.job_id = 'job_bad'
                BEGIN SELECT RAISE(ABORT, 'frames of job_bad are refused'); END;
            CREATE TRIGGER refuse_job BEFORE INSERT ON jobs WHEN NEW.job_id = 'job_bad'
                BEGIN SELECT RAISE(ABORT, 'job_bad is refused'); END;
        """)
        side.close()


class PgMaker(Maker):
    kind = "postgres"

    def __init__(self, url: str) -> None:
        self.url = url

    def open(self, **options: Any) -> QueuedStore:
        log_bytes = options.pop("session_log_bytes", 64 * MiB)
        return PostgresStore(self.url, log_bytes, **options)

    def refuse_job_bad(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as side:
            side.execute("""
                CREATE FUNCTION refuse_job_bad() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    IF TG_TABLE_NAME = 'frames' THEN RAISE EXCEPTION 'frames of job_bad are refused'; END IF;
                    RAISE EXCEPTION 'job_bad is refused';
                END $$;
                CREATE TRIGGER refuse_frame BEFORE INSERT ON frames FOR EACH ROW
                    WHEN (NEW.job_id = 'job_bad') EXECUTE FUNCTION refuse_job_bad();
                CREATE TRIGGER refuse_job BEFORE INSERT ON jobs FOR EACH ROW
                    WHEN (NEW.job_id = 'job_bad') EXECUTE FUNCTION refuse_job_bad();
            """)


@pytest.fixture(params=["sqlite", "postgres"])
def maker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Maker]:
    if request.param == "sqlite":
        yield SqliteMaker(tmp_path)
    else:
        yield PgMaker(request.getfixturevalue("pg_url"))


async def _opened(maker: Maker, **options: Any) -> QueuedStore:
    store = maker.open(**options)
    await store.sync()
    return store


# -- the contract, on both stores -------------------------------------------------------------------
def test_every_operation_round_trips(maker: Maker) -> None:
    async def main() -> None:
        store = await _opened(maker)
        _insert(store, "job_a", "s1", idem="k1")
        _insert(store, "job_b", "s2")
        store.add_credentials("job_a", ["cred_1", "cred_2"])
        store.add_credentials("job_b", ["cred_3"])
        store.log_frame("s1", 1, "job_a", b"a1")
        store.log_frame("s1", 2, "job_b", b"b1 (s1 watches job_b)")
        store.log_frame("s1", 3, "job_a", b"a2")
        store.log_frame("s2", 1, "job_b", b"b1")
        await store.sync()
        assert await store.terminal_of("job_a") is None
        assert await store.frames_since("s1", 0) == [(1, b"a1"), (2, b"b1 (s1 watches job_b)"), (3, b"a2")]
        assert await store.frames_since("s1", 2) == [(3, b"a2")]
        assert await store.oldest_seq("s1") == 1
        assert await store.oldest_seq("nobody") is None
        assert await store.job_frames("s1", "job_a", 0) == [b"a1", b"a2"]
        assert await store.job_frames("s1", "job_a", 1) == [b"a2"]
        assert sorted(await store.unrevoked_credentials(finished_only=False)) == ["cred_1", "cred_2", "cred_3"]
        assert await store.unrevoked_credentials(finished_only=True) == []
        store.log_frame("s1", 3, "job_a", b"a2 again")  # the same seq: replaced
        assert await store.frames_since("s1", 2) == [(3, b"a2 again")]

        terminal = {"status": "success", "value": {"ok": True}}
        store.finish_job("job_a", "success", terminal, {"input": {"n": 1}, "job": "job_a", "ended": True})
        assert await store.terminal_of("job_a") == terminal
        assert sorted(await store.unrevoked_credentials(finished_only=True)) == ["cred_1", "cred_2"]
        # a bound on when the job finished (a sweep leaves the newest to their own process)
        assert await store.unrevoked_credentials(True, time.time_ns() - 60 * 10**9) == []
        assert sorted(await store.unrevoked_credentials(True, time.time_ns() + 10**9)) == ["cred_1", "cred_2"]
        store.revocation_attempted("cred_1", revoked=False)
        store.revocation_attempted("cred_2", revoked=True)
        assert await store.unrevoked_credentials(finished_only=True) == ["cred_1"]

        store.forget_session("s1")  # its copy of s2's job_b goes; its own job's frames stay
        assert [s for s, _ in await store.frames_since("s1", 0)] == [1, 3]
        assert await store.frames_since("s2", 0) == [(1, b"b1")]

        store.delete_jobs(["job_a"])
        store.delete_jobs([])
        assert await store.frames_since("s1", 0) == []
        assert await store.terminal_of("job_a") is None
        jobs, interrupted = await store.recover(retention_jobs=100, retention_seconds=3600)
        assert [j.job_id for j in jobs] == ["job_b"] and interrupted == 1
        job = jobs[0]
        assert (job.principal, job.session_id, job.agent, job.trace_id) == ("alice", "s2", "echo@1.0.0",
                                                                            "trace-job_b")
        assert job.record == {"input": {"n": 1}, "job": "job_b"}
        assert store.failures == 0 and store.healthy
        await store.close()

    _run(main())


def test_a_read_sees_the_writes_queued_before_it_and_not_after(maker: Maker) -> None:
    async def main() -> None:
        store = maker.open()
        store.log_frame("s", 1, "j", b"one")
        read = asyncio.ensure_future(store.frames_since("s", 0))
        await asyncio.sleep(0)  # the read is queued now
        store.log_frame("s", 2, "j", b"two")
        assert [s for s, _ in await read] == [1]
        assert [s for s, _ in await store.frames_since("s", 0)] == [1, 2]
        _insert(store, "job_x")
        store.finish_job("job_x", "success", {"status": "success"}, {})
        assert await store.terminal_of("job_x") == {"status": "success"}  # no sync() in between
        await store.close()

    _run(main())


def test_the_writes_of_one_loop_turn_make_one_transaction(maker: Maker) -> None:
    async def main() -> None:
        store = await _opened(maker)
        commits, batches = store.commits, store.batches
        for i in range(5000):
            store.log_frame("s", i + 1, "job_a", b"frame %d" % i)
        _insert(store, "job_a")
        store.add_credentials("job_a", ["c1"])
        await store.sync()
        assert store.commits == commits + 1
        assert store.batches == batches + 1
        assert len(await store.frames_since("s", 0)) == 5000
        await store.close()

    _run(main())


def test_a_session_log_stays_within_its_bytes(maker: Maker) -> None:
    async def main() -> None:
        store = maker.open(session_log_bytes=2 * MiB)
        for batch in range(40):  # 40 batches of 10 frames of 64 KiB: 25 MiB in all
            _log(store, "s1", 1 + batch * 10, 10, 64 * 1024)
            await store.sync()
            assert await _logged_bytes(store, "s1") <= 2 * MiB
        assert await _logged_bytes(store, "s1") > 2 * MiB - 2 * MiB // 4
        seqs = [s for s, _ in await store.frames_since("s1", 0)]
        assert seqs == list(range(seqs[0], 401)), "the newest frames are kept, without holes"
        assert await store.oldest_seq("s1") == seqs[0] > 1
        _log(store, "s2", 1, 3, 10)
        assert [s for s, _ in await store.frames_since("s2", 0)] == [1, 2, 3]
        await store.close()

    _run(main())


def test_the_newest_frame_stays_and_deleted_or_forgotten_frames_leave_the_tally(maker: Maker) -> None:
    async def main() -> None:
        store = maker.open(session_log_bytes=MiB)
        _log(store, "s", 1, 1, 600 * 1024)
        await store.sync()
        _log(store, "s", 2, 1, MiB - 8192)
        assert [s for s, _ in await store.frames_since("s", 0)] == [2]
        assert await _logged_bytes(store, "s") <= MiB

        _log(store, "t", 1, 10, 64 * 1024, job="job_old")
        store.delete_jobs(["job_old"])
        _log(store, "t", 11, 14, 64 * 1024, job="job_new")  # 896 KiB: under the bound once job_old is gone
        assert [s for s, _ in await store.frames_since("t", 0)] == list(range(11, 25))

        _log(store, "u", 1, 10, 64 * 1024, job="job_other")  # 640 KiB of another session's job
        store.forget_session("u")
        _log(store, "u", 11, 14, 64 * 1024, job="job_other")  # 896 KiB, counted from nothing
        assert [s for s, _ in await store.frames_since("u", 0)] == list(range(11, 25))
        await store.close()

    _run(main())


def test_a_failing_write_is_rolled_back_alone(maker: Maker) -> None:
    async def main() -> None:
        store = await _opened(maker)
        maker.refuse_job_bad()
        batches, commits = store.batches, store.commits
        _insert(store, "job_good")
        store.log_frame("s", 1, "job_good", b"one")
        store.log_frame("s", 2, "job_bad", b"secret contents")
        store.log_frame("s", 3, "job_good", b"three")
        _insert(store, "job_bad")
        store.add_credentials("job_good", ["cred_good"])
        store.finish_job("job_good", "success", {"status": "success"}, {})
        with pytest.raises(StoreError) as e:
            await store.sync()
        assert store.batches == batches + 1
        message = str(e.value)
        assert "2 writes could not be committed" in message
        assert "log_frame session=s seq=2 job=job_bad" in message and "frames of job_bad are refused" in message
        assert "insert_job job=job_bad" in message and "job_bad is refused" in message
        assert "secret contents" not in message
        assert len(e.value.failed) == 2
        assert store.failures == 2 and not store.healthy
        assert store.commits == commits + 5  # the five good writes, one per transaction
        assert [s for s, _ in await store.frames_since("s", 0)] == [1, 3]
        assert await store.terminal_of("job_good") == {"status": "success"}
        assert await store.unrevoked_credentials(finished_only=True) == ["cred_good"]

        await store.sync()  # the failure was reported once
        assert not store.healthy  # until writes are committed again
        store.log_frame("s", 4, "job_good", b"four")
        store.log_frame("s", 5, "job_good", b"five")
        commits = store.commits
        await store.sync()
        assert store.commits == commits + 1
        assert [s for s, _ in await store.frames_since("s", 0)] == [1, 3, 4, 5]
        assert store.failures == 2 and store.healthy

        _insert(store, "job_bad")  # no sync() in its batch: the next one reports it
        for _ in range(500):
            if store.failures == 3:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(StoreError, match="insert_job job=job_bad"):
            await store.sync()
        await store.close()

    _run(main())


def test_an_idempotency_key_is_held_by_one_job(maker: Maker) -> None:
    async def main() -> None:
        store = await _opened(maker)
        assert await _claim(store, "job_1", "key") is None
        held = await _claim(store, "job_2", "key")
        assert held is not None and held.job_id == "job_1" and held.fingerprint == b"fp-job_1"
        with pytest.raises(StoreError, match="claim_job job=job_1.*exists"):
            await _claim(store, "job_1", "other key")
        assert store.failures == 0  # told to its caller: not a failed write for sync()
        _insert(store, "job_3", idem="key")  # a queued insert with a key that is held fails like a write
        with pytest.raises(StoreError, match="insert_job job=job_3"):
            await store.sync()
        assert store.failures == 1
        jobs, _ = await store.recover(100, 3600)
        assert [j.job_id for j in jobs] == ["job_1"]
        await store.close()

    _run(main())


def test_recover_after_reopening_ends_running_jobs(maker: Maker) -> None:
    async def main() -> None:
        store = maker.open()
        _insert(store, "job_done", "s1")
        store.add_credentials("job_done", ["cred_done"])
        store.log_frame("s1", 1, "job_done", b"done 1")
        store.finish_job("job_done", "success", {"status": "success", "value": 1}, {"job": "job_done"})
        _insert(store, "job_running", "s1")
        store.add_credentials("job_running", ["cred_running"])
        store.log_frame("s1", 2, "job_running", b"running 1")
        await store.close()

        store = maker.open()
        jobs, interrupted = await store.recover(retention_jobs=100, retention_seconds=3600)
        assert interrupted == 1
        by_id = {j.job_id: j for j in jobs}
        assert list(by_id) == ["job_done", "job_running"]
        assert by_id["job_done"].terminal == {"status": "success", "value": 1}
        ended = by_id["job_running"]
        assert ended.status == "error" and ended.terminal is not None
        assert ended.terminal["error"] == {"code": "INTERNAL_ERROR", "retryable": True, "message": RESTART_MESSAGE}
        assert sorted(await store.unrevoked_credentials(finished_only=False)) == ["cred_done", "cred_running"]
        await store.close()

        store = maker.open()  # retention by count keeps the job that finished last
        jobs, interrupted = await store.recover(retention_jobs=1, retention_seconds=3600)
        assert [j.job_id for j in jobs] == ["job_running"] and interrupted == 0
        assert await store.frames_since("s1", 0) == [(2, b"running 1")]
        await store.close()

        store = maker.open()  # and by age
        time.sleep(0.01)
        jobs, interrupted = await store.recover(retention_jobs=100, retention_seconds=0)
        assert jobs == [] and interrupted == 0
        assert await store.frames_since("s1", 0) == []
        await store.close()

    _run(main())


def test_close_applies_what_is_queued_then_refuses(maker: Maker) -> None:
    async def main() -> None:
        store = maker.open()
        _log(store, "s", 1, 500, 100)
        _insert(store, "job_a")
        await store.close()
        assert not store.healthy
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            store.log_frame("s", 501, "job_a", b"late")
        with pytest.raises(StoreError, match="closed"):
            await store.frames_since("s", 0)
        store = maker.open()
        assert [s for s, _ in await store.frames_since("s", 0)] == list(range(1, 501))
        await store.close()

    _run(main())


def test_writes_past_the_queue_bound_are_refused_and_writable_holds_a_flood(maker: Maker) -> None:
    async def main() -> None:
        store = await _opened(maker, max_queued_ops=100, max_queued_bytes=10_000)
        _log(store, "s", 1, 100, 10)
        with pytest.raises(StoreError, match=r"log_frame session=s seq=101 .*queue is full"):
            store.log_frame("s", 101, "job_a", b"x")
        assert store.failures == 1 and not store.healthy
        assert [s for s, _ in await store.frames_since("s", 0)] == list(range(1, 101))
        assert store.healthy and store.queued == (0, 0)
        await store.close()

        store = await _opened(maker, session_log_bytes=512 * MiB)
        frame = b"x" * (256 * 1024)
        n = (HIGH_WATER_BYTES // len(frame)) * 2
        for i in range(n):
            store.log_frame("flood", i + 1, "job_1", frame)
        waited = asyncio.ensure_future(store.writable())
        await asyncio.sleep(0)
        assert not waited.done(), "writable() did not hold a producer past the high-water mark"
        await asyncio.wait_for(waited, 30)
        assert store.queued[1] <= LOW_WATER_BYTES
        await store.sync()
        assert len(await store.frames_since("flood", 0)) == n
        await store.close()

    _run(main())


# -- PostgreSQL's own -------------------------------------------------------------------------
def test_the_schema_is_created_at_open_and_a_newer_one_is_refused(pg_url: str) -> None:
    async def main() -> None:
        store = await PostgresStore.open(pg_url, node_id="node_a")
        await store.close()
        with psycopg.connect(pg_url, autocommit=True) as side:
            tables = {r[0] for r in side.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
            assert tables == {"schema_version", "nodes", "jobs", "frames", "credentials", "sessions", "relay", "follows", "commands"}
            assert side.execute("SELECT max(version) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
            columns = {r[0] for r in side.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'")}
            assert "node_id" in columns
            assert side.execute("SELECT node_id FROM nodes").fetchall() == [("node_a",)]
        store = await PostgresStore.open(pg_url, node_id="node_a")  # opened again: nothing to migrate
        await store.close()
        with psycopg.connect(pg_url, autocommit=True) as side:
            assert side.execute("SELECT count(*) FROM schema_version").fetchone() == (SCHEMA_VERSION,)
            side.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 98,))
        with pytest.raises(StoreError) as e:
            await PostgresStore.open(pg_url, node_id="node_a")
        assert f"version {SCHEMA_VERSION + 98}" in str(e.value) and f"version {SCHEMA_VERSION}," in str(e.value)

    _run(main())


def test_two_stores_on_one_database_see_each_others_commits(pg_url: str) -> None:
    async def main() -> None:
        a = await PostgresStore.open(pg_url, node_id="node_a")
        b = await PostgresStore.open(pg_url, node_id="node_b")
        with pytest.raises(StoreError, match="node id 'node_a' is in use"):
            await PostgresStore.open(pg_url, node_id="node_a")
        _insert(a, "job_a", "sa")
        a.log_frame("sa", 1, "job_a", b"from a")
        await a.sync()
        assert await b.frames_since("sa", 0) == [(1, b"from a")]
        a.finish_job("job_a", "success", {"status": "success"}, {})
        await a.sync()
        assert await b.terminal_of("job_a") == {"status": "success"}
        _insert(b, "job_b", "sb")  # running on node_b, which is alive: a's recover leaves it be
        b.log_frame("sb", 1, "job_b", b"from b")
        await b.sync()
        jobs, interrupted = await a.recover(100, 3600)
        assert [j.job_id for j in jobs] == ["job_a"] and interrupted == 0
        assert await a.job_frames("sb", "job_b", 0) == [b"from b"]
        with psycopg.connect(pg_url, autocommit=True) as side:
            assert dict(side.execute("SELECT job_id, node_id FROM jobs").fetchall()) == {
                "job_a": "node_a", "job_b": "node_b"}
        await b.close()  # node_b gone (its lock released): its running job is ended by a's recover
        jobs, interrupted = await a.recover(100, 3600)
        assert [j.job_id for j in jobs] == ["job_a", "job_b"] and interrupted == 1
        assert jobs[1].terminal is not None and jobs[1].terminal["error"]["retryable"] is True
        assert jobs[1].terminal["error"]["details"] == {"reason": "node lost", "node": "node_b"}
        assert [r[:2] for r in await a.take_relay("sb", 10)] == [("job_b", "terminal")]  # for sb's next node
        assert await a.take_relay("sb", 10) == []
        await a.close()

    _run(main())


def test_racing_stores_claim_each_idempotency_key_once(pg_url: str) -> None:
    async def main() -> None:
        a = await PostgresStore.open(pg_url, node_id="node_a")
        b = await PostgresStore.open(pg_url, node_id="node_b")
        keys = [f"key_{i}" for i in range(50)]
        results = await asyncio.gather(*[_claim(s, f"job_{name}_{k}", k) for k in keys
                                         for name, s in (("a", a), ("b", b))])
        for i, k in enumerate(keys):
            ra, rb = results[2 * i], results[2 * i + 1]
            assert (ra is None) != (rb is None), (k, ra, rb)
            winner = f"job_a_{k}" if ra is None else f"job_b_{k}"
            assert (ra or rb).job_id == winner
        # queued inserts racing for one key: one row, the other reported by its store's sync()
        _insert(a, "job_qa", idem="queued")
        _insert(b, "job_qb", idem="queued")
        outcomes = await asyncio.gather(a.sync(), b.sync(), return_exceptions=True)
        assert sum(isinstance(o, StoreError) for o in outcomes) == 1, outcomes
        assert a.failures + b.failures == 1
        with psycopg.connect(pg_url, autocommit=True) as side:
            assert side.execute("SELECT count(*) FROM jobs").fetchone() == (51,)
            assert side.execute("SELECT count(DISTINCT (principal, idempotency_key)) FROM jobs").fetchone() == (51,)
        await a.close()
        await b.close()

    _run(main())


def test_a_server_restart_loses_nothing_queued(pg_server: PgServer, pg_url: str) -> None:
    async def main() -> None:
        store = await PostgresStore.open(pg_url, node_id="node_a", max_queued_ops=60)
        _insert(store, "job_a", "s")
        _log(store, "s", 1, 5, 10)
        await store.sync()
        assert store.healthy and store.connected
        await asyncio.to_thread(pg_server.halt)
        try:
            _log(store, "s", 6, 5, 10)  # the writer finds the connection gone
            for _ in range(500):
                if not store.connected:
                    break
                await asyncio.sleep(0.01)
            assert not store.connected and not store.healthy
            _log(store, "s", 11, 40, 10)  # kept in memory meanwhile, within the bound ...
            store.finish_job("job_a", "success", {"status": "success"}, {"job": "job_a"})
            refused = 0
            for seq in range(51, 71):  # ... past which writes are refused, and counted
                try:
                    store.log_frame("s", seq, "job_a", b"late")
                except StoreError as e:
                    assert "queue is full" in str(e)
                    refused += 1
            assert refused > 0 and store.failures == refused
            read = asyncio.ensure_future(store.frames_since("s", 0))  # reads wait for the database
            await asyncio.sleep(2)
            assert not read.done() and not store.healthy
        finally:
            await asyncio.to_thread(pg_server.start)
        rows = await asyncio.wait_for(read, 30)
        await store.sync()
        seqs = [s for s, _ in rows]
        assert seqs[:50] == list(range(1, 51)) and len(seqs) == 50 + (20 - refused)
        assert await store.terminal_of("job_a") == {"status": "success"}
        assert store.failures == refused and store.healthy and store.connected
        await store.close()

    _run(main())


def test_close_gives_up_on_a_database_that_stays_away(pg_server: PgServer, pg_url: str) -> None:
    async def main() -> None:
        store = await PostgresStore.open(pg_url, node_id="node_a", close_timeout=1.0)
        await asyncio.to_thread(pg_server.halt)
        try:
            _log(store, "s", 1, 3, 10)
            started = time.monotonic()
            await store.close()
            assert time.monotonic() - started < 10
            assert store.failures == 3 and not store.healthy
        finally:
            await asyncio.to_thread(pg_server.start)

    _run(main())


def test_a_database_that_cannot_be_reached_fails_the_open(pg_server: PgServer) -> None:
    async def main() -> None:
        url = pg_server.url("no_such_database")
        with pytest.raises(StoreError, match="cannot open the state database postgresql://postgres@127.0.0.1"):
            await PostgresStore.open(url)
        with pytest.raises(ValueError):
            PostgresStore("sqlite:///x")

    _run(main())
