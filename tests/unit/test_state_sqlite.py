"""supervisor/state/sqlite.py: the store on its writer thread: round trips, order, batching, the
frame log's byte bound, failures rolled back alone, recovery after a restart, close, the queue's bound."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from supervisor.state.base import RESTART_MESSAGE, StateStore, StoreError
from supervisor.state import queued
from supervisor.state.sqlite import DB_NAME, SqliteStore

MiB = 1024 * 1024
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def _state(tmp_path: Path, on_file: bool) -> str | None:
    return str(tmp_path / "state") if on_file else None


def _insert(store: StateStore, job_id: str, session: str = "s1", idem: str | None = None) -> None:
    store.insert_job(job_id, "alice", session, "echo@1.0.0", "running", "2025-01-01T00:00:00.000000Z",
                     "trace-" + job_id, idem, b"fp" if idem else None, {"input": {"n": 1}, "job": job_id})


def _log(store: StateStore, session: str, first: int, n: int, size: int, job: str = "job_a") -> None:
    for seq in range(first, first + n):
        store.log_frame(session, seq, job, b"%d:" % seq + b"x" * size)


async def _logged_bytes(store: StateStore, session: str) -> int:
    return sum(len(f) for _, f in await store.frames_since(session, 0))


def _side(store: SqliteStore) -> sqlite3.Connection:
    """Another connection to a file database, as another process would have."""
    return sqlite3.connect(store.path, isolation_level=None)


# -- round trips and order --------------------------------------------------------------------
@pytest.mark.parametrize("on_file", [True, False], ids=["file", "memory"])
def test_every_operation_round_trips(tmp_path: Path, on_file: bool) -> None:
    async def main() -> None:
        store = await SqliteStore.open(_state(tmp_path, on_file))
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
        assert await store.job_frames("s2", "job_b", 0) == [b"b1"]
        assert sorted(await store.unrevoked_credentials(finished_only=False)) == ["cred_1", "cred_2", "cred_3"]
        assert await store.unrevoked_credentials(finished_only=True) == []

        terminal = {"status": "success", "value": {"ok": True}}
        store.finish_job("job_a", "success", terminal, {"input": {"n": 1}, "job": "job_a", "ended": True})
        assert await store.terminal_of("job_a") == terminal
        assert sorted(await store.unrevoked_credentials(finished_only=True)) == ["cred_1", "cred_2"]
        # a bound on when the job finished (a sweep leaves the newest to their own process)
        assert await store.unrevoked_credentials(True, time.time_ns() - 60 * 10**9) == []
        assert sorted(await store.unrevoked_credentials(True, time.time_ns() + 10**9)) == ["cred_1", "cred_2"]
        store.revocation_attempted("cred_1", revoked=False)  # one more attempt: still to revoke
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


def test_a_read_sees_the_writes_queued_before_it_and_not_after() -> None:
    async def main() -> None:
        store = SqliteStore(None)
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


def test_the_writes_of_one_loop_turn_make_one_transaction(tmp_path: Path) -> None:
    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path))
        commits, batches = store.commits, store.batches
        for i in range(20_000):  # longer than the interpreter's thread switch interval
            store.log_frame("s", i + 1, "job_a", b"frame %d" % i)
        _insert(store, "job_a")
        store.add_credentials("job_a", ["c1"])
        await store.sync()
        assert store.commits == commits + 1
        assert store.batches == batches + 1
        assert len(await store.frames_since("s", 0)) == 20_000
        await store.close()

    _run(main())


def test_writes_nobody_awaits_wait_for_others_and_a_read_takes_them_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job's writes come over several loop turns: they make one batch. A read (someone
    awaits it) does not wait for the grouping delay, and sees them."""
    monkeypatch.setattr(queued, "GROUP_DELAY", 5.0)

    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path))
        batches = store.batches
        for i in range(3):  # acceptance, an event, the end: one turn each
            store.log_frame("s", i + 1, "job_a", b"frame %d" % i)
            await asyncio.sleep(0)
        t0 = time.monotonic()
        assert [s for s, _ in await store.frames_since("s", 0)] == [1, 2, 3]
        assert time.monotonic() - t0 < 4.0, "the read waited for the grouping delay"
        assert store.batches == batches + 1
        await store.close()

    _run(main())


def test_writes_nobody_awaits_reach_the_database_unasked(tmp_path: Path) -> None:
    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path))
        side = _side(store)
        for i in range(3):
            store.log_frame("s", i + 1, "job_a", b"frame %d" % i)
            await asyncio.sleep(0)
        deadline = time.monotonic() + 10
        while side.execute("SELECT count(*) FROM frames").fetchone()[0] < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert side.execute("SELECT count(*) FROM frames").fetchone()[0] == 3
        side.close()
        await store.close()

    _run(main())


# -- the frame log's byte bound (as supervisor/state/store.py's) ------------------------------------
@pytest.mark.parametrize("on_file", [True, False], ids=["file", "memory"])
def test_a_session_log_stays_within_its_bytes(tmp_path: Path, on_file: bool) -> None:
    async def main() -> None:
        store = SqliteStore(_state(tmp_path, on_file), session_log_bytes=2 * MiB)
        for batch in range(40):  # 40 batches of 10 frames of 64 KiB: 25 MiB in all
            _log(store, "s1", 1 + batch * 10, 10, 64 * 1024)
            await store.sync()
            assert await _logged_bytes(store, "s1") <= 2 * MiB
        assert await _logged_bytes(store, "s1") > 2 * MiB - 2 * MiB // 4
        seqs = [s for s, _ in await store.frames_since("s1", 0)]
        assert seqs == list(range(seqs[0], 401)), "the newest frames are kept, without holes"
        assert await store.oldest_seq("s1") == seqs[0] > 1
        _log(store, "s2", 1, 3, 10)  # another session's log is its own
        assert [s for s, _ in await store.frames_since("s2", 0)] == [1, 2, 3]
        assert await store.oldest_seq("s1") == seqs[0]
        await store.close()

    _run(main())


def test_one_big_batch_is_trimmed_to_the_bound_too() -> None:
    async def main() -> None:
        store = SqliteStore(None, session_log_bytes=2 * MiB)
        _log(store, "s", 1, 100, 64 * 1024)  # 6.4 MiB in one loop turn: two transactions (BATCH_BYTES)
        await store.sync()
        assert store.batches == 2
        assert 2 * MiB - 2 * MiB // 4 < await _logged_bytes(store, "s") <= 2 * MiB
        seqs = [s for s, _ in await store.frames_since("s", 0)]
        assert seqs == list(range(seqs[0], 101))
        await store.close()

    _run(main())


def test_the_newest_frame_stays_even_when_it_is_most_of_the_bound() -> None:
    async def main() -> None:
        store = SqliteStore(None, session_log_bytes=MiB)
        _log(store, "s", 1, 1, 600 * 1024)
        await store.sync()
        _log(store, "s", 2, 1, MiB - 8192)
        assert [s for s, _ in await store.frames_since("s", 0)] == [2]
        assert await _logged_bytes(store, "s") <= MiB
        await store.close()

    _run(main())


def test_deleted_jobs_leave_the_tally_true() -> None:
    """Frames that retention deletes are no longer counted: the log then keeps more frames."""
    async def main() -> None:
        store = SqliteStore(None, session_log_bytes=MiB)
        _log(store, "s", 1, 10, 64 * 1024, job="job_old")
        store.delete_jobs(["job_old"])
        _log(store, "s", 11, 14, 64 * 1024, job="job_new")  # 896 KiB: under the bound once job_old is gone
        assert [s for s, _ in await store.frames_since("s", 0)] == list(range(11, 25))
        await store.close()

    _run(main())


def test_a_forgotten_session_starts_a_new_tally() -> None:
    async def main() -> None:
        store = SqliteStore(None, session_log_bytes=MiB)
        _log(store, "s", 1, 10, 64 * 1024, job="job_other")  # 640 KiB of another session's job
        store.forget_session("s")
        _log(store, "s", 11, 14, 64 * 1024, job="job_other")  # 896 KiB, counted from nothing
        assert [s for s, _ in await store.frames_since("s", 0)] == list(range(11, 25))
        await store.close()

    _run(main())


def test_a_big_log_leaves_a_small_database(tmp_path: Path) -> None:
    """Trimmed rows are deleted and their pages reused; the WAL is cut back after checkpoints."""
    async def main() -> None:
        store = SqliteStore(str(tmp_path), session_log_bytes=4 * MiB)
        for batch in range(100):  # 100 MiB through one session
            _log(store, "s", 1 + batch * 16, 16, 64 * 1024)
            await store.sync()
        files = {n: os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path)}
        assert files[DB_NAME] < 8 * MiB, files
        assert sum(files.values()) < 24 * MiB, files
        await store.close()

    _run(main())


def test_state_dir_and_database_are_private(tmp_path: Path) -> None:
    async def main() -> None:
        state = tmp_path / "a" / "state"
        store = SqliteStore(str(state))
        _log(store, "s", 1, 3, 100)
        await store.sync()
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        names = sorted(os.listdir(state))
        assert names == [DB_NAME, DB_NAME + "-shm", DB_NAME + "-wal"]
        for name in names:
            assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name
        await store.close()

    old = os.umask(0o022)
    try:
        _run(main())
    finally:
        os.umask(old)


def test_files_left_with_a_wide_mode_are_made_private(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteStore(str(tmp_path))
        _log(store, "s", 1, 3, 100)
        await store.close()
        for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
            p = tmp_path / name
            if p.exists():
                os.chmod(p, 0o644)
        store = SqliteStore(str(tmp_path))
        _log(store, "s", 4, 1, 100)
        await store.sync()
        for name in os.listdir(tmp_path):
            assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
        assert [s for s, _ in await store.frames_since("s", 0)] == [1, 2, 3, 4]
        await store.close()

    _run(main())


# -- failures -------------------------------------------------------------------------------
def _refuse_job_bad(store: SqliteStore) -> None:
    side = _side(store)
    side.executescript("""
        CREATE TRIGGER refuse_frame BEFORE INSERT ON frames WHEN NEW.job_id = 'job_bad'
            BEGIN SELECT RAISE(ABORT, 'frames of job_bad are refused'); END;
        CREATE TRIGGER refuse_job BEFORE INSERT ON jobs WHEN NEW.job_id = 'job_bad'
            BEGIN SELECT RAISE(ABORT, 'job_bad is refused'); END;
    """)
    side.close()


def test_a_failing_write_is_rolled_back_alone(tmp_path: Path) -> None:
    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path))
        _refuse_job_bad(store)
        batches, commits = store.batches, store.commits
        # one batch: the failures sit among writes that must all be kept
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
        jobs, _ = await store.recover(100, 3600)
        assert [j.job_id for j in jobs] == ["job_good"]

        await store.sync()  # the failure was reported once
        assert not store.healthy  # until writes are committed again
        store.log_frame("s", 4, "job_good", b"four")  # the next batches work, in one transaction again
        store.log_frame("s", 5, "job_good", b"five")
        commits = store.commits
        await store.sync()
        assert store.commits == commits + 1
        assert [s for s, _ in await store.frames_since("s", 0)] == [1, 3, 4, 5]
        assert store.failures == 2 and store.healthy
        await store.close()

    _run(main())


def test_every_sync_waiting_on_a_failed_write_hears_of_it(tmp_path: Path) -> None:
    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path))
        _refuse_job_bad(store)
        _insert(store, "job_bad")
        first = asyncio.ensure_future(store.sync())
        second = asyncio.ensure_future(store.sync())
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert all(isinstance(r, StoreError) and "insert_job job=job_bad" in str(r) for r in results), results
        _insert(store, "job_bad")  # no sync() in its batch: the next one reports it
        for _ in range(500):
            if store.failures == 2:
                break
            await asyncio.sleep(0.01)
        assert store.failures == 2
        with pytest.raises(StoreError, match="insert_job job=job_bad"):
            await store.sync()
        await store.sync()
        await store.close()

    _run(main())


def test_a_rolled_back_batch_leaves_the_byte_tally_as_it_was(tmp_path: Path) -> None:
    """The frames of a failed batch are applied again one by one: counted once, not twice."""
    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path), session_log_bytes=MiB)
        _refuse_job_bad(store)
        _log(store, "s", 1, 1, 600 * 1024)
        _insert(store, "job_bad")
        with pytest.raises(StoreError):
            await store.sync()
        _log(store, "s", 2, 1, 300 * 1024)  # 900 KiB: under the bound, nothing trimmed
        assert [s for s, _ in await store.frames_since("s", 0)] == [1, 2]
        await store.close()

    _run(main())


def test_a_failing_read_raises_store_error_and_is_not_a_write_failure(tmp_path: Path) -> None:
    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path))
        _insert(store, "job_a")
        await store.sync()
        side = _side(store)
        side.execute("UPDATE jobs SET terminal = x'ff' WHERE job_id = 'job_a'")  # not JSON
        side.close()
        with pytest.raises(StoreError, match="terminal_of job=job_a"):
            await store.terminal_of("job_a")
        assert store.failures == 0
        assert await store.oldest_seq("s") is None
        await store.close()

    _run(main())


def test_a_database_that_cannot_be_opened_fails_loudly(tmp_path: Path) -> None:
    async def main() -> None:
        tmp_path.chmod(0o700)
        (tmp_path / DB_NAME).write_bytes(b"this is not a database" * 100)
        with pytest.raises(StoreError, match="cannot open the state database"):
            await SqliteStore.open(str(tmp_path))
        store = SqliteStore(str(tmp_path))
        with pytest.raises(StoreError, match="cannot open"):
            await store.frames_since("s", 0)
        with pytest.raises(StoreError, match="cannot open"):
            store.log_frame("s", 1, "j", b"x")
        assert not store.healthy
        await store.close()

    _run(main())


# -- restart, close, the loop, the bound ------------------------------------------------------------
def test_recover_after_reopening_ends_running_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        store = SqliteStore(str(tmp_path))
        _insert(store, "job_done", "s1")
        store.add_credentials("job_done", ["cred_done"])
        store.log_frame("s1", 1, "job_done", b"done 1")
        store.finish_job("job_done", "success", {"status": "success", "value": 1}, {"job": "job_done"})
        _insert(store, "job_running", "s1")
        store.add_credentials("job_running", ["cred_running"])
        store.log_frame("s1", 2, "job_running", b"running 1")
        await store.close()

        store = SqliteStore(str(tmp_path))
        jobs, interrupted = await store.recover(retention_jobs=100, retention_seconds=3600)
        assert interrupted == 1
        by_id = {j.job_id: j for j in jobs}
        assert list(by_id) == ["job_done", "job_running"]  # oldest first
        assert by_id["job_done"].status == "success"
        assert by_id["job_done"].terminal == {"status": "success", "value": 1}
        ended = by_id["job_running"]
        assert ended.status == "error" and ended.terminal is not None
        assert ended.terminal["error"] == {"code": "INTERNAL_ERROR", "retryable": True, "message": RESTART_MESSAGE}
        assert ended.terminal["completed_at"].endswith("Z")
        assert await store.terminal_of("job_running") == ended.terminal
        assert sorted(await store.unrevoked_credentials(finished_only=False)) == ["cred_done", "cred_running"]
        await store.close()

        store = SqliteStore(str(tmp_path))  # retention by count keeps the job that finished last
        jobs, interrupted = await store.recover(retention_jobs=1, retention_seconds=3600)
        assert [j.job_id for j in jobs] == ["job_running"] and interrupted == 0
        assert await store.frames_since("s1", 0) == [(2, b"running 1")]
        await store.close()

        store = SqliteStore(str(tmp_path))  # and by age
        time.sleep(0.01)
        jobs, interrupted = await store.recover(retention_jobs=100, retention_seconds=0)
        assert jobs == [] and interrupted == 0
        assert await store.frames_since("s1", 0) == []
        await store.close()

    _run(main())


@pytest.mark.parametrize("on_file", [True, False], ids=["file", "memory"])
def test_close_applies_what_is_queued_then_refuses(tmp_path: Path, on_file: bool) -> None:
    async def main() -> None:
        store = SqliteStore(_state(tmp_path, on_file))
        _log(store, "s", 1, 500, 100)
        _insert(store, "job_a")
        await store.close()
        assert not store.healthy
        await store.close()  # again: nothing happens
        with pytest.raises(StoreError, match="closed"):
            store.log_frame("s", 501, "job_a", b"late")
        with pytest.raises(StoreError, match="closed"):
            _insert(store, "job_b")
        with pytest.raises(StoreError, match="closed"):
            await store.frames_since("s", 0)
        with pytest.raises(StoreError, match="closed"):
            await store.sync()
        if on_file:
            store = SqliteStore(_state(tmp_path, on_file))
            assert [s for s, _ in await store.frames_since("s", 0)] == list(range(1, 501))
            jobs, _ = await store.recover(100, 3600)
            assert [j.job_id for j in jobs] == ["job_a"]
            await store.close()

    _run(main())


def test_the_loop_runs_while_the_database_is_locked(tmp_path: Path) -> None:
    """Another process holds the write lock for 0.3 s: the store waits on its thread, not on the loop."""
    async def main() -> None:
        store = await SqliteStore.open(str(tmp_path))
        locked, release = threading.Event(), threading.Event()

        def hold_lock() -> None:
            side = _side(store)
            side.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(0.3)
            side.execute("COMMIT")
            side.close()

        holder = threading.Thread(target=hold_lock)
        holder.start()
        locked.wait(5)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        tick_task = asyncio.ensure_future(ticker())
        start = time.monotonic()
        store.log_frame("s", 1, "j", b"one")
        rows = await store.frames_since("s", 0)
        elapsed = time.monotonic() - start
        tick_task.cancel()
        holder.join()
        assert rows == [(1, b"one")]
        assert elapsed >= 0.25
        assert ticks >= 10, f"{ticks} ticks in {elapsed:.2f} s"
        await store.close()

    _run(main())


def test_writes_past_the_queue_bound_are_refused_loudly(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store = await SqliteStore.open(None, max_queued_ops=100, max_queued_bytes=10_000)
        _log(store, "s", 1, 100, 10)  # one loop turn: the writer has not taken any yet
        with pytest.raises(StoreError, match=r"log_frame session=s seq=101 .*queue is full"):
            store.log_frame("s", 101, "job_a", b"x")
        with pytest.raises(StoreError, match="queue is full"):
            _insert(store, "job_a")
        assert store.failures == 2 and not store.healthy
        assert store.queued == (100, sum(len(b"%d:" % i) + 10 for i in range(1, 101)))
        assert [s for s, _ in await store.frames_since("s", 0)] == list(range(1, 101))  # reads still go
        assert store.healthy and store.queued == (0, 0)
        store.log_frame("s", 101, "job_a", b"x")  # accepted again
        await store.sync()

        _log(store, "t", 1, 2, 4000)
        with pytest.raises(StoreError, match=r"seq=3 .*queue is full .*bytes of frames"):
            _log(store, "t", 3, 1, 4000)
        await store.sync()
        assert [s for s, _ in await store.frames_since("t", 0)] == [1, 2]
        assert store.failures == 3
        await store.close()

    _run(main())
    refusals = [r for r in caplog.records if "refusing writes" in r.getMessage()]
    assert len(refusals) == 2 and all(r.levelname == "ERROR" for r in refusals)


def test_a_flood_is_written_in_bounded_transactions_and_writable_holds_its_producer(tmp_path: Path) -> None:
    """Frames queued faster than they are written: one transaction takes at most BATCH_BYTES of
    them (the WAL stays small), and writable() waits past the high-water mark, until the
    writer is back below the low one."""
    from supervisor.state import sqlite as sq
    from supervisor.state.base import HIGH_WATER_BYTES, LOW_WATER_BYTES

    async def go() -> None:
        store = await SqliteStore.open(str(tmp_path / "state"), 512 * 1024 * 1024)
        frame = b"x" * (256 * 1024)
        n = (HIGH_WATER_BYTES // len(frame)) * 2
        for i in range(n):  # one loop turn: all of it queued before the writer starts
            store.log_frame("sess_1", i + 1, "job_1", frame)
        assert store.queued[1] > HIGH_WATER_BYTES
        waited = asyncio.ensure_future(store.writable())
        await asyncio.sleep(0)
        assert not waited.done(), "writable() did not hold a producer past the high-water mark"
        await asyncio.wait_for(waited, 30)
        assert store.queued[1] <= LOW_WATER_BYTES
        await store.sync()
        assert store.batches >= n * len(frame) // sq.BATCH_BYTES
        assert len(await store.frames_since("sess_1", 0)) == n
        await store.close()
        await asyncio.wait_for(store.writable(), 1)  # closed: nothing to wait for
    asyncio.run(go())


def test_only_a_database_on_disk_is_durable(tmp_path: Path) -> None:
    async def go() -> None:
        memory, disk = SqliteStore(None), SqliteStore(str(tmp_path / "state"))
        assert not memory.durable and disk.durable  # a submit waits for the commit only on disk
        await memory.close()
        await disk.close()
    asyncio.run(go())
