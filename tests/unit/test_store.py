"""supervisor/store.py: the frame log bounded in bytes, and the state dir's modes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from supervisor.state.store import DB_NAME, Store

MiB = 1024 * 1024


def _log(store: Store, session: str, first: int, n: int, size: int, job: str = "job_a") -> None:
    for seq in range(first, first + n):
        store.log_frame(session, seq, job, b"%d:" % seq + b"x" * size)
    store.flush()


def _logged_bytes(store: Store, session: str) -> int:
    row = store.db.execute("SELECT SUM(length(frame)) FROM frames WHERE session_id = ?", (session,)).fetchone()
    return int(row[0] or 0)


@pytest.mark.parametrize("state", [False, True])
def test_a_session_log_stays_within_its_bytes(tmp_path: Path, state: bool) -> None:
    store = Store(str(tmp_path / "state") if state else None, session_log_bytes=2 * MiB)
    for batch in range(40):  # 40 batches of 10 frames of 64 KiB: 25 MiB in all
        _log(store, "s1", 1 + batch * 10, 10, 64 * 1024)
        assert _logged_bytes(store, "s1") <= 2 * MiB
    assert _logged_bytes(store, "s1") > 2 * MiB - 2 * MiB // 4
    seqs = [s for s, _ in store.frames_since("s1", 0)]
    assert seqs == list(range(seqs[0], 401)), "the newest frames are kept, without holes"
    assert store.oldest_seq("s1") == seqs[0] > 1
    _log(store, "s2", 1, 3, 10)  # another session's log is its own
    assert [s for s, _ in store.frames_since("s2", 0)] == [1, 2, 3]
    assert store.oldest_seq("s1") == seqs[0]
    store.close()


def test_the_newest_frame_stays_even_when_it_is_most_of_the_bound() -> None:
    store = Store(None, session_log_bytes=MiB)
    _log(store, "s", 1, 1, 600 * 1024)
    _log(store, "s", 2, 1, MiB - 8192)
    assert [s for s, _ in store.frames_since("s", 0)] == [2]
    assert _logged_bytes(store, "s") <= MiB


def test_deleted_jobs_leave_the_tally_true() -> None:
    """Frames that retention deletes are no longer counted: the log then keeps more frames."""
    store = Store(None, session_log_bytes=MiB)
    _log(store, "s", 1, 10, 64 * 1024, job="job_old")
    store.delete_jobs(["job_old"])
    _log(store, "s", 11, 14, 64 * 1024, job="job_new")  # 896 KiB: under the bound once job_old is gone
    assert [s for s, _ in store.frames_since("s", 0)] == list(range(11, 25))


def test_a_big_log_leaves_a_small_database(tmp_path: Path) -> None:
    """Trimmed rows are deleted and their pages reused; the WAL is cut back after checkpoints."""
    store = Store(str(tmp_path), session_log_bytes=4 * MiB)
    for batch in range(100):  # 100 MiB through one session
        _log(store, "s", 1 + batch * 16, 16, 64 * 1024)
    files = {n: os.path.getsize(tmp_path / n) for n in os.listdir(tmp_path)}
    assert files[DB_NAME] < 8 * MiB, files
    assert sum(files.values()) < 24 * MiB, files
    store.close()


def test_state_dir_and_database_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        state = tmp_path / "a" / "state"
        store = Store(str(state))
        _log(store, "s", 1, 3, 100)
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        names = sorted(os.listdir(state))
        assert names == [DB_NAME, DB_NAME + "-shm", DB_NAME + "-wal"]
        for name in names:
            assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name
        store.close()
    finally:
        os.umask(old)


def test_files_left_with_a_wide_mode_are_made_private(tmp_path: Path) -> None:
    store = Store(str(tmp_path))
    _log(store, "s", 1, 3, 100)
    store.close()
    for name in (DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm"):
        p = tmp_path / name
        if p.exists():
            os.chmod(p, 0o644)
    store = Store(str(tmp_path))
    _log(store, "s", 4, 1, 100)
    for name in os.listdir(tmp_path):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
    assert [s for s, _ in store.frames_since("s", 0)] == [1, 2, 3, 4]
    store.close()
