#!/usr/bin/env python3
"""The egress proxy's cost: a job's HTTP through the supervisor vs the same code on the host.

    python scripts/bench_lib/egress.py [--reps 5] [--quick] [--mib 64] [--gets 300] [--out FILE]

A local origin server (a raw-socket, thread-per-connection HTTP/1.1 server in a process of its
own, on 127.0.0.1:0, started once for the whole run) answers `GET /big/N` with N bytes sent
from a preallocated buffer in 4 MiB sendall calls, and `GET /small` with a 5-byte body; it
closes every connection after one response. Per repetition:

  proxy   arcp-supervisor (fresh worker per job, this folder as working directory; started once
          per repetition, killed by process group) runs two jobs with the lease
          {"net.fetch": ["http://127.0.0.1:PORT/**"]}: `egress_download` (urllib through the
          environment's proxy variables: one GET of /big/N, timed inside the agent: MiB/s) and
          `egress_small` (G sequential GETs of /small, a fresh connection each, after 10
          untimed ones: p50/p90 ms, timed inside the agent).
  direct  the same two functions (bench_agents.py) in a plain host Python subprocess, with
          urllib's proxies off (ProxyHandler({})) and the proxy variables removed.

Proxy and direct alternate (which goes first flips every repetition). --quick: 1 repetition
(unless --reps), 16 MiB and 100 GETs. Reported per metric, min/median/max over repetitions:
MiB/s both ways and their ratio (target >= 0.8), p50 both ways and the added p50 (target
<= 1 ms), and the supervisor's CPU seconds during the jobs (psutil, 10 ms ticks; its main
process, where the proxy runs; each agent also reports its own CPU time in the JSON).
Markdown on stdout, progress on stderr, everything as JSON in --out (default
bench-results/egress.json). Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import connect

from procgroup import stop_process_group

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
READY = re.compile(r"arcp-supervisor listening on (ws://\S+)")
ORIGIN_READY = re.compile(r"origin listening on http://127\.0\.0\.1:(\d+)")
AGENTS = ["--agent", "egress_download=bench_agents:egress_download",
          "--agent", "egress_small=bench_agents:egress_small"]
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
JOB_TIMEOUT = 180.0
_C = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# --- the origin (runs as `egress.py --origin`, a process of its own) ---

CHUNK = 4 << 20
SMALL = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
         b"hello")
NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
             b"Connection: close\r\n\r\nnot found\n")


def _handle(conn: socket.socket, buf: memoryview) -> None:
    with conn:
        try:
            conn.settimeout(30)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(65536)
                if not data or len(head) > 65536:
                    return
                head += data
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("latin-1") if len(parts) == 3 and parts[0] == b"GET" else ""
            if path.startswith("/big/") and path[5:].isdigit():
                n = int(path[5:])
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % n)
                while n > 0:
                    k = min(n, len(buf))
                    conn.sendall(buf[:k])
                    n -= k
            elif path == "/small":
                conn.sendall(SMALL)
            else:
                conn.sendall(NOT_FOUND)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def serve_origin() -> None:
    buf = memoryview(b"x" * CHUNK)
    sock = socket.create_server(("127.0.0.1", 0), backlog=128)
    print(f"origin listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_handle, args=(conn, buf), daemon=True).start()


# --- processes ---

def _wait_line(proc: subprocess.Popen[bytes], pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
    """The first stdout line of `proc` matching `pattern`, waiting at most `timeout` seconds."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending = b""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                continue
            data = os.read(fd, 65536)
            if not data:
                return None
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                m = pattern.search(line.decode(errors="replace"))
                if m:
                    return m
        return None
    finally:
        sel.close()


class Proc:
    """A child in a session (process group) of its own, ready once `pattern` shows on its stdout;
    stdout is drained afterwards so it never blocks on a full pipe."""

    def __init__(self, argv: list[str], pattern: re.Pattern[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        m = _wait_line(self.proc, pattern, 30)
        if m is None:
            self.stop()
            raise RuntimeError(f"did not start within 30 s: {argv}")
        self.match = m
        self.ps = psutil.Process(self.proc.pid)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout as f:
            while f.read(65536):
                pass

    def cpu(self) -> float:
        """CPU seconds of the process, its finished threads included (psutil: clock ticks, 10 ms)."""
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        stop_process_group(self.proc, 5)


def host_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS}


# --- the two sides ---

def ulid() -> str:
    v = (int(time.time() * 1000) << 80) | int.from_bytes(secrets.token_bytes(10), "big")
    return "".join(_C[(v >> (5 * i)) & 31] for i in reversed(range(26)))


async def job(url: str, agent: str, inp: dict[str, Any], lease: dict[str, Any]) -> dict[str, Any]:
    """Run one job over a raw ARCP session; its result, plus the proxy's net.bytes_in metrics."""
    async with connect(url, compression=None) as ws:
        await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "session.hello",
                                  "payload": {"client": {"name": "bench-egress", "version": "1"},
                                              "auth": {"scheme": "bearer", "token": ""},
                                              "capabilities": {"encodings": ["json"], "features": []}}}))
        welcome = json.loads(await ws.recv())
        if welcome["type"] != "session.welcome":
            raise RuntimeError(f"handshake failed: {welcome}")
        sid = welcome["payload"]["session_id"]
        await ws.send(json.dumps({"arcp": "1.1", "id": ulid(), "type": "job.submit", "session_id": sid,
                                  "payload": {"agent": agent, "input": inp, "lease_request": lease}}))
        bytes_in = 0
        while True:
            f = json.loads(await ws.recv())
            if f["type"] == "job.event" and f["payload"].get("kind") == "metric":
                body = f["payload"].get("body") or {}
                if body.get("name") == "net.bytes_in":
                    bytes_in += int(body.get("value", 0))
            elif f["type"] == "job.result":
                r = dict(f["payload"]["result"])
                r["net_bytes_in"] = bytes_in
                return r
            elif f["type"] in ("job.error", "session.error"):
                return {"error": f"{f['type']}: {f['payload']}"[:500]}


def via_proxy(srv: Proc, ws_url: str, agent: str, inp: dict[str, Any], port: int) -> dict[str, Any]:
    lease = {"net.fetch": [f"http://127.0.0.1:{port}/**"]}
    cpu0, t0 = srv.cpu(), time.perf_counter()
    try:
        r = asyncio.run(asyncio.wait_for(job(ws_url, agent, inp, lease), JOB_TIMEOUT))
    except Exception as e:  # recorded, the run goes on
        r = {"error": f"{type(e).__name__}: {e}"[:500]}
    r["job_wall_s"] = time.perf_counter() - t0
    r["supervisor_cpu_s"] = srv.cpu() - cpu0
    if "error" not in r and not str(r.get("proxy", "")).startswith("http://127.0.0.1:"):
        r["error"] = f"the job saw no egress proxy (http_proxy={r.get('proxy')!r})"
    return r


def direct(func: str, inp: dict[str, Any]) -> dict[str, Any]:
    code = ("import json, sys, bench_agents\n"
            f"print(json.dumps(bench_agents.{func}(json.loads(sys.argv[1]), None)))")
    try:
        out = subprocess.run([sys.executable, "-c", code, json.dumps({**inp, "direct": True})], check=False,
                             cwd=HERE, env=host_env(), capture_output=True, timeout=JOB_TIMEOUT,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"the direct run took over {JOB_TIMEOUT:g} s"}
    if out.returncode != 0:
        return {"error": f"exit {out.returncode}: {out.stderr.decode(errors='replace')[-500:]}"}
    try:
        r: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no result from the direct run: {out.stdout[-300:]!r}"}
    return r


# --- report ---

def stats(vals: list[float]) -> dict[str, float] | None:
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)} if vals else None


def summarise(reps: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    def ok(r: dict[str, Any]) -> bool:
        return "error" not in r

    rows: dict[str, list[float]] = {k: [] for k in (
        "proxy_mib_s", "direct_mib_s", "ratio", "proxy_p50_ms", "direct_p50_ms", "added_p50_ms",
        "proxy_p90_ms", "direct_p90_ms", "supervisor_cpu_s_download", "supervisor_cpu_per_gib_s",
        "supervisor_cpu_ms_per_get")}
    for rep in reps:
        pd, dd = rep["proxy"]["download"], rep["direct"]["download"]
        ps, ds = rep["proxy"]["small"], rep["direct"]["small"]
        if ok(pd):
            rows["proxy_mib_s"].append(pd["mib_s"])
            rows["supervisor_cpu_s_download"].append(pd["supervisor_cpu_s"])
            rows["supervisor_cpu_per_gib_s"].append(pd["supervisor_cpu_s"] / (pd["bytes"] / 2**30))
        if ok(dd):
            rows["direct_mib_s"].append(dd["mib_s"])
        if ok(pd) and ok(dd):
            rows["ratio"].append(pd["mib_s"] / dd["mib_s"])
        if ok(ps):
            rows["proxy_p50_ms"].append(ps["p50_ms"])
            rows["proxy_p90_ms"].append(ps["p90_ms"])
            rows["supervisor_cpu_ms_per_get"].append(ps["supervisor_cpu_s"] * 1e3 / (ps["n"] + 10))
        if ok(ds):
            rows["direct_p50_ms"].append(ds["p50_ms"])
            rows["direct_p90_ms"].append(ds["p90_ms"])
        if ok(ps) and ok(ds):
            rows["added_p50_ms"].append(ps["p50_ms"] - ds["p50_ms"])
    return {k: {"values": v, **(stats(v) or {})} for k, v in rows.items()}


LABELS = [
    ("proxy_mib_s", "download MiB/s, proxy", "", None),
    ("direct_mib_s", "download MiB/s, direct", "", None),
    ("ratio", "throughput ratio proxy/direct", ">= 0.8", lambda m: m >= 0.8),
    ("proxy_p50_ms", "small GET p50 ms, proxy", "", None),
    ("direct_p50_ms", "small GET p50 ms, direct", "", None),
    ("added_p50_ms", "added p50 ms (proxy - direct)", "<= 1.0", lambda m: m <= 1.0),
    ("proxy_p90_ms", "small GET p90 ms, proxy", "", None),
    ("direct_p90_ms", "small GET p90 ms, direct", "", None),
    ("supervisor_cpu_s_download", "supervisor CPU s, whole download job", "", None),
    ("supervisor_cpu_per_gib_s", "supervisor CPU s per GiB (whole job)", "", None),
    ("supervisor_cpu_ms_per_get", "supervisor CPU ms per small GET (whole job)", "", None),
]


def markdown(summary: dict[str, dict[str, Any]], reps: int, mib: int, gets: int) -> str:
    title = (f"\n### egress proxy vs direct ({reps} rep(s), {mib} MiB download, {gets} small GETs, "
             f"{os.cpu_count()} CPUs)\n")
    out = [title, "| metric | min | median | max | target | median meets it |",
           "|---|---|---|---|---|---|"]
    for key, label, target, check in LABELS:
        s = summary[key]
        if "median" not in s:
            out.append(f"| {label} | - | - | - | {target} | no data |")
            continue
        verdict = ("yes" if check(s["median"]) else "NO") if check else ""
        out.append(f"| {label} | {s['min']:.3f} | {s['median']:.3f} | {s['max']:.3f} | {target} | {verdict} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, help="repetitions (default 5; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="1 rep (unless --reps), 16 MiB, 100 GETs")
    ap.add_argument("--mib", type=int, help="download size in MiB (default 64; 16 with --quick)")
    ap.add_argument("--gets", type=int, help="timed small GETs per job (default 300; 100 with --quick)")
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "egress.json"))
    ap.add_argument("--origin", action="store_true", help=argparse.SUPPRESS)  # serve the origin only
    args = ap.parse_args()
    if args.origin:
        serve_origin()
        return
    reps = args.reps or (1 if args.quick else 5)
    mib = args.mib or (16 if args.quick else 64)
    gets = args.gets or (100 if args.quick else 300)
    if min(reps, mib, gets) < 1:
        sys.exit("--reps, --mib and --gets must be positive")
    supervisor = [str(ROOT / ".venv" / "bin" / "arcp-supervisor"), "run", "--port", "0", *AGENTS]
    origin = Proc([sys.executable, str(Path(__file__).resolve()), "--origin"], ORIGIN_READY, HERE, host_env())
    results: list[dict[str, Any]] = []
    try:
        port = int(origin.match.group(1))
        base = f"http://127.0.0.1:{port}"
        work: dict[str, tuple[str, dict[str, Any]]] = {
            "download": ("egress_download", {"url": f"{base}/big/{mib << 20}"}),
            "small": ("egress_small", {"url": f"{base}/small", "n": gets, "warmup": 10})}
        for rep in range(reps):
            srv = Proc(supervisor, READY, HERE)
            ws_url = srv.match.group(1)
            rec: dict[str, Any] = {"rep": rep + 1, "proxy": {}, "direct": {}}
            try:
                sides = ["proxy", "direct"] if rep % 2 == 0 else ["direct", "proxy"]
                for kind, (agent, inp) in work.items():
                    for side in sides:
                        ocpu = origin.cpu()
                        r = via_proxy(srv, ws_url, agent, inp, port) if side == "proxy" else direct(agent, inp)
                        r["origin_cpu_s"] = origin.cpu() - ocpu
                        rec[side][kind] = r
                        brief = (f"{r['mib_s']:.0f} MiB/s" if "mib_s" in r else
                                 f"p50 {r['p50_ms']:.3f} ms p90 {r['p90_ms']:.3f} ms" if "p50_ms" in r else
                                 r.get("error"))
                        print(f"[rep {rep + 1}/{reps}] {kind:8s} {side:6s} {brief}", file=sys.stderr, flush=True)
            finally:
                srv.stop()
            results.append(rec)
    finally:
        origin.stop()
    summary = summarise(results)
    doc = {"config": {"reps": reps, "mib": mib, "gets": gets, "warmup_gets": 10, "cpus": os.cpu_count(),
                      "server": "arcp-supervisor, one process per repetition, fresh worker per job",
                      "origin": "raw-socket thread-per-connection HTTP/1.1 on 127.0.0.1, once per run"},
           "summary": summary, "reps": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(markdown(summary, reps, mib, gets))
    print(f"[egress] wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
