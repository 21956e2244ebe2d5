"""What the state store costs per job, on each store: SQLite in memory, SQLite on disk (WAL,
synchronous=NORMAL) and PostgreSQL on this host (a private server from tests/postgres.py,
fsync on; once with synchronous_commit on, once off, which is what SQLite's synchronous=NORMAL
compares with: a crash may lose the last commits, never corrupt).

Each job is the sequence a submit makes: insert_job, FRAMES log_frame calls, finish_job, then
`await sync()` (one commit round trip per job, the worst case: under load, jobs' writes batch
up). Reported: µs per job, min / median / max over REPS repetitions of JOBS jobs each.

    .venv/bin/python scripts/bench_lib/store_cost.py [--jobs 500] [--reps 5] [--frames 4]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from supervisor.state.postgres import PostgresStore  # noqa: E402
from supervisor.state.queued import QueuedStore  # noqa: E402
from supervisor.state.sqlite import SqliteStore  # noqa: E402
from tests.postgres import PgServer  # noqa: E402

FRAME = b'{"type":"job.event","body":{"kind":"log","text":"' + b"x" * 160 + b'"}}'


async def one_rep(store: QueuedStore, rep: int, jobs: int, frames: int) -> float:
    """µs per job for `jobs` jobs."""
    started = time.perf_counter()
    for n in range(jobs):
        job_id, session = f"job_{rep}_{n}", f"sess_{rep}_{n % 16}"
        store.insert_job(job_id, "alice", session, "echo@1.0.0", "running", "2025-01-01T00:00:00.000000Z",
                         "trace", None, None, {"input": {"n": n}, "lease": {"net.fetch": ["*"]}})
        for i in range(frames):
            store.log_frame(session, n * (frames + 1) + i + 1, job_id, FRAME)
        store.finish_job(job_id, "success", {"status": "success", "value": {"n": n}}, {"input": {"n": n}})
        await store.sync()
    return (time.perf_counter() - started) / jobs * 1e6


async def measure(make: Callable[[], QueuedStore], jobs: int, reps: int, frames: int) -> list[float]:
    store = make()
    await store.sync()
    await one_rep(store, -1, min(jobs, 50), frames)  # warm-up: connection, prepared statements, pages
    costs = [await one_rep(store, rep, jobs, frames) for rep in range(reps)]
    await store.close()
    return costs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--frames", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="arcp-store-cost-") as tmp:
        server = PgServer(settings={"max_connections": "20"})  # fsync on: PostgreSQL's defaults
        try:
            stores: list[tuple[str, Callable[[], QueuedStore]]] = [
                ("sqlite, in memory", lambda: SqliteStore(None)),
                ("sqlite, on disk (WAL, synchronous=NORMAL)", lambda: SqliteStore(str(Path(tmp) / "state"))),
                ("postgresql, local, synchronous_commit=on",
                 lambda: PostgresStore(server.url(server.create_database()), node_id="bench")),
                ("postgresql, local, synchronous_commit=off",
                 lambda: PostgresStore(server.url(server.create_database(), options="-c%20synchronous_commit%3Doff"),
                                       node_id="bench")),
            ]
            print(f"µs per job ({args.frames} frames of {len(FRAME)} B, insert + finish + sync), "
                  f"{args.reps} reps of {args.jobs} jobs")
            print(f"{'store':45} {'min':>8} {'median':>8} {'max':>8}")
            for name, make in stores:
                costs = asyncio.run(measure(make, args.jobs, args.reps, args.frames))
                print(f"{name:45} {min(costs):8.0f} {statistics.median(costs):8.0f} {max(costs):8.0f}", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
