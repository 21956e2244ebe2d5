#!/usr/bin/env python3
"""Session benchmarks (issue: sessions that survive), ours and the SDK runtime side by side.

    python scripts/bench_lib/sessions.py [--reps 3] [--quick] [--out FILE]

Workloads, each on a fresh server process per repetition, interleaved:
  slow-burst   one job emits 100k log events; the client reads about 10x slower than
               the agent writes. Peak RSS growth of the server process, and whether
               every event arrived exactly once and in order.
  jobs-rss     10,000 sequential noop jobs (ours with --retention-jobs 1000): server RSS
               after them minus RSS before.
  resume       a client submits a 10,000-event burst and drops its connection at once
               (no close); when the job is done it resumes with last_event_seq 0: time
               from the resume hello to the last replayed event, and how many arrived.
Servers are started with ../shared/bench as working directory (its agents_bench module)
and killed by process group. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect

from procgroup import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT.parent / "shared" / "bench"
READY = re.compile(r"arcp-supervisor listening on (ws://\S+)")
AGENTS = ["--agent", "noop@1.0.0=agents_bench:noop", "--agent", "burst@1.0.0=agents_bench:burst"]
_C = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    v = (int(time.time() * 1000) << 80) | int.from_bytes(secrets.token_bytes(10), "big")
    return "".join(_C[(v >> (5 * i)) & 31] for i in reversed(range(26)))


class Server:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        self.url = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            m = READY.search(line)
            if m:
                self.url = m.group(1)
                break
            if not line and self.proc.poll() is not None:
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"server did not start: {argv}")
        self.ps = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        stop_process_group(self.proc, 3)


def servers(quick: bool) -> dict[str, list[str]]:
    py = str(ROOT / ".venv" / "bin" / "python")
    return {
        "sdk": [py, str(BENCH / "sdk_server.py"), "run", "--port", "0", *AGENTS],
        "ours": [str(ROOT / ".venv" / "bin" / "arcp-supervisor"), "run", "--port", "0", "--retention-jobs", "1000",
                 *AGENTS],
    }


async def hello(ws: Any, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {"client": {"name": "bench", "version": "1"}, "auth": {"scheme": "bearer", "token": ""},
                               "capabilities": {"encodings": ["json"], "features": ["heartbeat", "ack"]}}
    if resume:
        payload["resume"] = resume
    await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "session.hello", "payload": payload}))
    w: dict[str, Any] = json.loads(await ws.recv())
    if w["type"] != "session.welcome":
        raise RuntimeError(f"handshake failed: {w}")
    return w


async def submit(ws: Any, sid: str, agent: str, inp: Any) -> None:
    await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "job.submit", "session_id": sid,
                              "payload": {"agent": agent, "input": inp, "lease_request": {}}}))


async def slow_burst(srv: Server, n: int) -> dict[str, Any]:
    rss0 = srv.rss()
    peak = rss0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, srv.rss())
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    async with connect(srv.url, max_size=2**24, max_queue=2, compression=None) as ws:
        w = await hello(ws)
        sid = w["payload"]["session_id"]
        t0 = time.perf_counter()
        await submit(ws, sid, "burst", {"n": n})
        got, expect, in_order = 0, 0, True
        while True:
            f = json.loads(await ws.recv())
            if f["type"] == "job.event" and f["payload"]["kind"] == "log":
                msg = f["payload"]["body"]["message"]
                if msg.startswith("burst "):
                    in_order &= int(msg.split()[1]) == expect
                    expect += 1
                    got += 1
                    if got % 200 == 0:
                        await asyncio.sleep(0.02)  # ~10k events/s: about 10x slower than the agent writes
            elif f["type"] in ("job.result", "job.error"):
                break
        elapsed = time.perf_counter() - t0
    done.set()
    await sampler
    return {"events": got, "in_order": in_order and got == n, "seconds": elapsed,
            "peak_rss_growth_mib": (peak - rss0) / 2**20}


async def jobs_rss(srv: Server, n: int) -> dict[str, Any]:
    async with connect(srv.url, compression=None) as ws:
        w = await hello(ws)
        sid = w["payload"]["session_id"]

        async def one(i: int) -> None:
            await submit(ws, sid, "noop", {"i": i})
            while True:
                f = json.loads(await ws.recv())
                if f["type"] in ("job.result", "job.error"):
                    return

        for i in range(200):  # warm up
            await one(i)
        rss0 = srv.rss()
        t0 = time.perf_counter()
        for i in range(n):
            await one(i)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.5)
        rss1 = srv.rss()
    return {"jobs": n, "seconds": elapsed, "rss_growth_mib": (rss1 - rss0) / 2**20}


async def resume(srv: Server, n: int) -> dict[str, Any]:
    ws = await connect(srv.url, compression=None)
    w = await hello(ws)
    sid, token = w["payload"]["session_id"], w["payload"]["resume_token"]
    await submit(ws, sid, "burst", {"n": n})
    first = json.loads(await ws.recv())  # job.accepted
    assert first["type"] == "job.accepted", first
    ws.transport.abort()  # a network cut
    await asyncio.sleep(max(1.0, n / 20000))  # the job finishes while the client is away
    async with connect(srv.url, max_size=2**24, compression=None) as ws2:
        t0 = time.perf_counter()
        try:
            await hello(ws2, {"session_id": sid, "resume_token": token, "last_event_seq": 0})
        except RuntimeError as e:
            return {"resumed": False, "error": str(e)[:200]}
        got = 0
        try:
            while True:
                f = json.loads(await asyncio.wait_for(ws2.recv(), 2.0))
                if f["type"] == "job.event":
                    got += 1
                if f["type"] in ("job.result", "job.error"):
                    break
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - t0
    return {"resumed": True, "replayed_events": got, "complete": got >= n, "seconds": elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 rep, smaller sizes")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "sessions.json"))
    args = ap.parse_args()
    if not BENCH.is_dir():
        sys.exit(f"benchmark harness not found at {BENCH}")
    reps = 1 if args.quick else args.reps
    sizes = {"slow-burst": 20_000 if args.quick else 100_000, "jobs-rss": 1000 if args.quick else 10_000,
             "resume": 10_000}
    work = {"slow-burst": slow_burst, "jobs-rss": jobs_rss, "resume": resume}
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {} for w in work}
    for rep in range(reps):
        for wname, fn in work.items():
            for sname, argv in servers(args.quick).items():
                srv = Server(argv)
                try:
                    r = asyncio.run(asyncio.wait_for(fn(srv, sizes[wname]), 600))
                except Exception as e:  # recorded, the run goes on
                    r = {"error": f"{type(e).__name__}: {e}"[:300]}
                finally:
                    srv.stop()
                results[wname].setdefault(sname, []).append(r)
                print(f"[rep {rep + 1}/{reps}] {wname:10s} {sname:5s} {r}", file=sys.stderr, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    keys = {"slow-burst": "peak_rss_growth_mib", "jobs-rss": "rss_growth_mib", "resume": "seconds"}
    print("\n| workload | metric | server | min | median | max | notes |\n|---|---|---|---|---|---|---|")
    for wname, by_server in results.items():
        k = keys[wname]
        for sname, runs in by_server.items():
            vals = [r[k] for r in runs if k in r]
            notes = ""
            if wname == "slow-burst":
                notes = "in order: " + ",".join(str(r.get("in_order")) for r in runs)
            if wname == "resume":
                notes = "replayed: " + ",".join(str(r.get("replayed_events", r.get("error", "-"))) for r in runs)
            if vals:
                print(f"| {wname} | {k} | {sname} | {min(vals):.2f} | {statistics.median(vals):.2f} | "
                      f"{max(vals):.2f} | {notes} |")
            else:
                print(f"| {wname} | {k} | {sname} | - | - | - | {runs[0].get('error', '')[:80]} |")


if __name__ == "__main__":
    main()
