"""supervisor/sandbox/job_uids.py: jobs waiting for a uid are served in their start order; uids
another supervisor on the host holds are never shared."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from supervisor.sandbox.job_uids import HostUidClaims, UidPool


def test_waiters_are_served_in_start_order_not_arrival_order() -> None:
    async def go() -> None:
        pool = UidPool(10, 10)
        assert await pool.acquire(1) == 10
        late = asyncio.ensure_future(pool.acquire(5))  # asks first, started later
        early = asyncio.ensure_future(pool.acquire(3))
        same = asyncio.ensure_future(pool.acquire(5))  # same place: first come
        await asyncio.sleep(0)
        assert not (late.done() or early.done() or same.done())
        pool.release(10)
        assert await asyncio.wait_for(early, 5) == 10 and not late.done()
        pool.release(10)
        assert await asyncio.wait_for(late, 5) == 10 and not same.done()
        pool.release(10)
        assert await asyncio.wait_for(same, 5) == 10
    asyncio.run(go())


def test_a_cancelled_waiter_is_skipped() -> None:
    async def go() -> None:
        pool = UidPool(7, 7)
        await pool.acquire(1)
        gone = asyncio.ensure_future(pool.acquire(2))
        next_ = asyncio.ensure_future(pool.acquire(3))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        pool.release(7)
        assert await asyncio.wait_for(next_, 5) == 7 and pool.free == 0
    asyncio.run(go())


_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
for uid in sys.argv[2:]:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(uid), os.SEEK_SET)
print("held", flush=True)
sys.stdin.read()
"""


def test_uids_another_supervisor_holds_are_skipped_and_taken_once_it_is_gone(tmp_path: Path) -> None:
    """Another process (another supervisor on the host) holds uids 10 and 11 of the same range:
    this pool hands out 12, then waits for 10 or 11 rather than share one, and takes them once
    that process has exited (the kernel drops its claims)."""
    path = str(tmp_path / "claims.lock")
    other = subprocess.Popen([sys.executable, "-c", _HOLDER, path, "10", "11"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"

        async def go() -> None:
            pool = UidPool(10, 12, claims=HostUidClaims(path))
            assert await pool.acquire() == 12
            waiting = asyncio.ensure_future(pool.acquire())
            await asyncio.sleep(0.2)
            assert not waiting.done(), "took a uid another supervisor's job has"
            assert other.stdin is not None
            other.stdin.close()
            other.wait(10)
            assert await asyncio.wait_for(waiting, 5) in (10, 11)
            pool.release(12)  # given back: another supervisor may claim it now
            probe = subprocess.run([sys.executable, "-c", _HOLDER, path, "12"], input="", capture_output=True,
                                   text=True, timeout=10)
            assert probe.returncode == 0 and probe.stdout.strip() == "held", probe.stderr
        asyncio.run(go())
    finally:
        other.kill()
        other.wait(10)
