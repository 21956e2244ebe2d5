#!/usr/bin/env python3
"""The cost of the supervisor's authority checks, seen from an agent.

    python scripts/bench_lib/authority.py [--reps 5] [--n 5000]

Runs `arcp-supervisor` (fresh worker per job) and submits a job whose agent calls
`job.validate_lease_op` n times, timing each round trip to the supervisor over the
worker pipe; prints p50/p99 per repetition and min/median/max over repetitions.
(The cost.* metric workload, side by side with the SDK runtime, is bench.py's
`cost` workload: `scripts/bench --workloads cost`.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from pathlib import Path

from websockets.asyncio.client import connect

from procgroup import started_server, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
_C = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    v = (int(time.time() * 1000) << 80) | int.from_bytes(secrets.token_bytes(10), "big")
    return "".join(_C[(v >> (5 * i)) & 31] for i in reversed(range(26)))


async def one(url: str, n: int) -> dict[str, float]:
    async with connect(url, compression=None) as ws:
        await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "session.hello",
                                  "payload": {"client": {"name": "bench", "version": "1"},
                                              "auth": {"scheme": "bearer", "token": ""},
                                              "capabilities": {"encodings": ["json"], "features": []}}}))
        sid = json.loads(await ws.recv())["payload"]["session_id"]
        await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "job.submit", "session_id": sid,
                                  "payload": {"agent": "leaseops", "input": {"n": n},
                                              "lease_request": {"fs.read": ["/data/**"]}}}))
        while True:
            f = json.loads(await ws.recv())
            if f["type"] == "job.result":
                return dict(f["payload"]["result"])
            if f["type"] in ("job.error", "session.error"):
                raise RuntimeError(str(f["payload"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=5000)
    args = ap.parse_args()
    argv = [str(ROOT / ".venv" / "bin" / "arcp-supervisor"), "run", "--port", "0",
            "--agent", "leaseops=bench_agents:leaseops"]
    p50s, p99s = [], []
    for rep in range(args.reps):
        proc, url = started_server(argv, HERE)
        try:
            r = asyncio.run(asyncio.wait_for(one(url, args.n), 300))
        finally:
            stop_process_group(proc, 3)
        p50s.append(r["p50_us"])
        p99s.append(r["p99_us"])
        print(f"[rep {rep + 1}] validate_lease_op round trip: p50 {r['p50_us']:.1f} us, p99 {r['p99_us']:.1f} us")
    print("\n| metric | min | median | max |\n|---|---|---|---|")
    for name, vals in (("validate_lease_op p50 (us)", p50s), ("validate_lease_op p99 (us)", p99s)):
        print(f"| {name} | {min(vals):.1f} | {statistics.median(vals):.1f} | {max(vals):.1f} |")


if __name__ == "__main__":
    main()
