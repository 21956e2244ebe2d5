#!/usr/bin/env python3
"""Where a job's CPU goes with reused workers, process by process and thread by thread, beside
the SDK's runtime doing the same jobs.

    python scripts/bench_lib/breakdown.py [--reps 3] [--jobs 400] [--events 0] [--bare]

Sequential jobs of the harness's agents (`noop`, or `burst` with `--events N` log events),
submitted one at a time over one session by a lean raw WebSocket client (hello, submit, read
to the terminal), on a fresh server process per repetition, the SDK's runtime and ours
(`--reuse-workers 1000`) interleaved. Per repetition, psutil's CPU time per job of:

  sdk            the SDK runtime's process (all its threads)
  loop           our supervisor's main thread: its event loop
  threads        our supervisor's other threads (the state store's writer, to_thread workers)
  worker main    our workers' main threads (the agent's thread), summed
  worker pipe    our workers' other threads (each worker's pipe thread), summed
  fork server    our fork server itself
  ours           all of ours together

and the median round trip (p50). `--bare` runs ours with `--no-metrics --no-usage
--log-level warning` (the two log records per job, the metrics and the usage accounting
off). Prints markdown: min / median / max over the repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from pathlib import Path

import psutil
from websockets.asyncio.client import connect

from procgroup import started_server, stop_process_group

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT.parent / "shared" / "bench"
AGENTS = ["--agent", "noop@1.0.0=agents_bench:noop", "--agent", "burst@1.0.0=agents_bench:burst"]
WARMUP = 50
_C = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    v = (int(time.time() * 1000) << 80) | int.from_bytes(secrets.token_bytes(10), "big")
    return "".join(_C[(v >> (5 * i)) & 31] for i in reversed(range(26)))


def _thread_cpu(p: psutil.Process) -> dict[int, float]:
    """CPU seconds of each thread of `p` (tid -> user + system); empty once it is gone."""
    try:
        return {t.id: t.user_time + t.system_time for t in p.threads()}
    except psutil.Error:
        return {}


class Tree:
    """A server's processes and threads, read at one moment: CPU seconds by part."""

    def __init__(self, pid: int, ours: bool) -> None:
        self.pid = pid
        self.ours = ours

    def read(self) -> dict[tuple[str, int], float]:
        """(part, tid) -> CPU seconds, for every live thread of the tree."""
        top = psutil.Process(self.pid)
        out: dict[tuple[str, int], float] = {}
        if not self.ours:
            for tid, cpu in _thread_cpu(top).items():
                out[("sdk", tid)] = cpu
            return out
        for tid, cpu in _thread_cpu(top).items():
            out[("loop" if tid == self.pid else "threads", tid)] = cpu
        for fs in top.children():
            for tid, cpu in _thread_cpu(fs).items():
                out[("fork server", tid)] = cpu
            try:
                workers = fs.children()
            except psutil.Error:
                continue
            for w in workers:
                for tid, cpu in _thread_cpu(w).items():
                    out[("worker main" if tid == w.pid else "worker pipe", tid)] = cpu
        return out


def per_part(before: dict[tuple[str, int], float], after: dict[tuple[str, int], float]) -> dict[str, float]:
    """CPU seconds by part between two reads (threads that ended in between are not counted:
    a kept worker outlives the measurement)."""
    out: dict[str, float] = {}
    for key, cpu in after.items():
        out[key[0]] = out.get(key[0], 0.0) + cpu - before.get(key, 0.0)
    return out


async def drive(url: str, tree: Tree, jobs: int, events: int) -> dict[str, float]:
    agent, inp = ("burst", {"n": events}) if events else ("noop", {"x": 1})
    async with connect(url, max_size=2**24, compression=None) as ws:
        await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "session.hello", "payload": {
            "client": {"name": "bench", "version": "1"}, "auth": {"scheme": "bearer", "token": ""},
            "capabilities": {"encodings": ["json"], "features": []}}}))
        w = json.loads(await ws.recv())
        if w["type"] != "session.welcome":
            raise RuntimeError(f"handshake failed: {w}")
        sid = w["payload"]["session_id"]

        async def one() -> None:
            await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "job.submit", "session_id": sid,
                                      "payload": {"agent": agent, "input": inp, "lease_request": {}}}))
            while True:
                f = json.loads(await ws.recv())
                if f["type"] in ("job.result", "job.error"):
                    if f["type"] == "job.error":
                        raise RuntimeError(f"job failed: {f['payload']}")
                    return

        for _ in range(WARMUP):
            await one()
        before = tree.read()
        times = []
        for _ in range(jobs):
            t0 = time.perf_counter()
            await one()
            times.append(time.perf_counter() - t0)
        parts = per_part(before, tree.read())
    out = {k: v / jobs * 1000 for k, v in parts.items()}
    out["p50"] = statistics.median(times) * 1000
    if tree.ours:
        out["ours"] = sum(v for k, v in out.items() if k != "p50")
    return out


def run_one(argv: list[str], ours: bool, jobs: int, events: int) -> dict[str, float]:
    proc, url = started_server(argv, BENCH)
    try:
        time.sleep(1.0)  # the warm workers are forked
        return asyncio.run(drive(url, Tree(proc.pid, ours), jobs, events))
    finally:
        stop_process_group(proc, 3)


PARTS = ["sdk", "loop", "threads", "worker main", "worker pipe", "fork server", "ours"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=400)
    ap.add_argument("--events", type=int, default=0, help="log events per job (the `burst` agent); 0: `noop`")
    ap.add_argument("--bare", action="store_true", help="ours with --no-metrics --no-usage --log-level warning")
    ap.add_argument("--quick", action="store_true", help="1 repetition of 100 jobs")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.jobs = 1, 100
    py = str(ROOT / ".venv" / "bin" / "python")
    sdk = [py, str(BENCH / "sdk_server.py"), "run", "--port", "0", *AGENTS]
    ours = [str(ROOT / ".venv" / "bin" / "arcp-supervisor"), "run", "--port", "0", "--reuse-workers", "1000",
            *AGENTS]
    if a.bare:
        ours += ["--no-metrics", "--no-usage", "--log-level", "warning"]
    rows: dict[str, list[float]] = {}
    for _ in range(a.reps):
        for argv, is_ours in ((sdk, False), (ours, True)):
            got = run_one(argv, is_ours, a.jobs, a.events)
            for k, ms in got.items():
                rows.setdefault(("ours p50" if is_ours else "sdk p50") if k == "p50" else k, []).append(ms)
    what = f"`burst` with {a.events} log events" if a.events else "`noop`"
    print(f"### CPU per job by part, {a.reps} × {a.jobs} sequential {what} jobs"
          f"{' (ours bare)' if a.bare else ''}\n")
    print("| part | ms per job, min / **median** / max |")
    print("| --- | --- |")
    for k in PARTS + ["sdk p50", "ours p50"]:
        v = rows.get(k)
        if v:
            print(f"| {k} | {min(v):.3f} / **{statistics.median(v):.3f}** / {max(v):.3f} |")
    if rows.get("sdk") and rows.get("ours"):
        r = [o / s for o, s in zip(rows["ours"], rows["sdk"])]
        print(f"| ours / sdk (CPU) | {min(r):.2f} / **{statistics.median(r):.2f}** / {max(r):.2f} |")


if __name__ == "__main__":
    main()
