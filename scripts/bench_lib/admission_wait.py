#!/usr/bin/env python3
"""What a queued job waits: admission under --max-jobs (docs/operating.md, "Capacity").

    python scripts/bench_lib/admission_wait.py [--reps 3] [--jobs 300] [--seconds 0.2] [--max-jobs 8]

Starts `arcp-supervisor run --max-jobs N`, sends `--jobs` submits of a job that sleeps
`--seconds` from one principal (alice) on one connection, as fast as they go out, then one
job from a second principal (bob) on another. For each job: the wait from just before its
submit was sent to the agent's start (the agent reports its start, wall clock, same host).
Prints min / median / p90 / max of alice's waits, bob's wait, and alice's jobs/s (jobs over
the time from the first submit to the last terminal) against the ideal N / seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from authority import HERE, ROOT, ulid  # noqa: E402  (run as a script: its directory is on the path)
from procgroup import started_server, stop_process_group  # noqa: E402


async def hello(url: str, token: str) -> tuple[ClientConnection, str]:
    ws = await connect(url, compression=None, max_size=None)
    await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "session.hello",
                              "payload": {"client": {"name": "bench", "version": "1"},
                                          "auth": {"scheme": "bearer", "token": token},
                                          "capabilities": {"encodings": ["json"], "features": []}}}))
    return ws, json.loads(await ws.recv())["payload"]["session_id"]


async def submit(ws: ClientConnection, sid: str, seconds: float) -> tuple[str, float]:
    rid = ulid()
    t = time.time()
    await ws.send(json.dumps({"arcp": "1.1", "id": rid, "type": "job.submit", "session_id": sid,
                              "payload": {"agent": "span", "input": {"seconds": seconds}}}))
    return rid, t


async def collect(ws: ClientConnection, want: dict[str, float], out: dict[str, Any]) -> None:
    """Until every submit (request id -> sent at) has its terminal: job id -> (sent, result, at)."""
    job_of: dict[str, str] = {}
    while len([k for k in out if k in job_of.values()]) < len(want):
        f = json.loads(await ws.recv())
        t = f.get("type")
        if t == "job.accepted":
            job_of[f["payload"]["request_id"]] = f["job_id"]
            out.setdefault("_sent", {})[f["job_id"]] = want[f["payload"]["request_id"]]
        elif t == "job.result":
            out[f["job_id"]] = (out["_sent"][f["job_id"]], f["payload"]["result"], time.time())
        elif t in ("job.error", "session.error"):
            raise RuntimeError(str(f["payload"]))


async def one(url: str, jobs: int, seconds: float) -> dict[str, Any]:
    ws_a, sid_a = await hello(url, "a")
    ws_b, sid_b = await hello(url, "b")
    try:
        sent_a = dict([await submit(ws_a, sid_a, seconds) for _ in range(jobs)])
        sent_b = dict([await submit(ws_b, sid_b, seconds)])
        res_a: dict[str, Any] = {}
        res_b: dict[str, Any] = {}
        await asyncio.gather(collect(ws_a, sent_a, res_a), collect(ws_b, sent_b, res_b))
    finally:
        await ws_a.close()
        await ws_b.close()
    alice = [v for k, v in res_a.items() if k != "_sent"]
    waits = sorted(r["start"] - sent for sent, r, _ in alice)
    first = min(sent_a.values())
    last = max(at for _, _, at in alice)
    (bob,) = [v for k, v in res_b.items() if k != "_sent"]
    return {"min": waits[0], "median": statistics.median(waits), "p90": waits[int(len(waits) * 0.9)],
            "max": waits[-1], "bob": bob[1]["start"] - bob[0], "jobs_per_s": jobs / (last - first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=0.2)
    ap.add_argument("--max-jobs", type=int, default=8)
    args = ap.parse_args()
    argv = [str(ROOT / ".venv" / "bin" / "arcp-supervisor"), "run", "--port", "0", "--max-jobs", str(args.max_jobs),
            "--token", "a=alice", "--token", "b=bob", "--agent", "span=bench_agents:span"]
    runs = []
    for rep in range(args.reps):
        proc, url = started_server(argv, HERE)
        try:
            r = asyncio.run(asyncio.wait_for(one(url, args.jobs, args.seconds), 600))
        finally:
            stop_process_group(proc, 3)
        runs.append(r)
        print(f"rep {rep + 1}: wait min {r['min']:.3f} / median {r['median']:.3f} / p90 {r['p90']:.3f} / "
              f"max {r['max']:.3f} s; second principal {r['bob']:.3f} s; {r['jobs_per_s']:.1f} jobs/s", flush=True)
    ideal = args.max_jobs / args.seconds
    print(f"\n{args.jobs} jobs of {args.seconds} s, --max-jobs {args.max_jobs} (ideal {ideal:.1f} jobs/s, "
          f"last job's ideal wait {(args.jobs - 1) // args.max_jobs * args.seconds:.2f} s); "
          f"min / median / max over {args.reps} repetitions:\n")
    print("| metric | min | median | max |\n| --- | --- | --- | --- |")
    for key, label in (("min", "shortest wait, s"), ("median", "median wait, s"), ("p90", "p90 wait, s"),
                       ("max", "longest wait, s"), ("bob", "second principal's wait, s"),
                       ("jobs_per_s", "jobs/s")):
        vals = sorted(r[key] for r in runs)
        print(f"| {label} | {vals[0]:.3f} | {statistics.median(vals):.3f} | {vals[-1]:.3f} |")


if __name__ == "__main__":
    main()
