#!/usr/bin/env python3
"""Several supervisor processes on one PostgreSQL (`scripts/bench --nodes 2`), in one run.

    .venv/bin/python scripts/bench_lib/nodes.py [--nodes 2] [--reps 5] [--quick] [--out FILE] [--log-dir DIR]
    .venv/bin/python scripts/bench_lib/nodes.py --report FILE   # a saved --out file's report again

Starts a private PostgreSQL (tests/postgres.py's PgServer: /usr/lib/postgresql/*/bin, as the
postgres user, 127.0.0.1, a free port, PostgreSQL's own defaults: fsync and synchronous_commit
on) and, in each repetition, interleaved:

  throughput  bench.py's throughput load (32 submitters on 32 connections, `noop` jobs back to
              back, raw driver; 10 s measured after 1 s of warm-up) against, each on fresh
              processes (and a fresh database):
                sdk       the SDK's in-process runtime (reference only: no store at all)
                sqlite-1  one arcp-supervisor, the default store (SQLite in memory)
                pg-1      one arcp-supervisor --state-url (PostgreSQL)
                pg-N      N arcp-supervisor --state-url on one database, the connections
                          (and so the submitters) split evenly between them
              every supervisor with --reuse-workers 1000 --max-result-bytes 128M (ours-reuse).
              jobs/s, and CPU per job of the client, the supervisors (their trees) and PostgreSQL.
  store       store_cost.py's µs per job of each store (insert + 4 frames + finish + sync),
              on the same PostgreSQL server.
  resume      two processes A and B on a fresh database; a session opens on A and runs one
              job to its end; then, RESUMES times: the transport is cut (no close), and the
              session is resumed on the other process (a handover between live processes),
              cut again and resumed on the same process (a resume with nothing to take over).
              The time from opening the connection to the resume's session.welcome; p50/p90.

Prints markdown: min / median / max over the repetitions (ratios taken per repetition).
Every server is stopped by process group and its descendants by pid (bench.py's ServerProc),
PostgreSQL with pg_ctl (by its pid file); every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT.parent / "shared" / "bench"
sys.path.insert(0, str(BENCH))  # bench.py: its server process, tree CPU, raw client
sys.path.insert(0, str(ROOT))

import bench  # noqa: E402
import psutil  # noqa: E402
import store_cost  # noqa: E402  (run as a script: its directory is on the path)
from websockets.asyncio.client import connect  # noqa: E402

from supervisor.state.postgres import PostgresStore  # noqa: E402
from supervisor.state.sqlite import SqliteStore  # noqa: E402
from tests.postgres import PgServer  # noqa: E402

SUPERVISOR = ROOT / ".venv" / "bin" / "arcp-supervisor"
REUSE = "--max-result-bytes 128M --reuse-workers 1000"  # scripts/bench's ours-reuse
START_TIMEOUT = 60.0
PHASE_TIMEOUT = 300.0
RESUME_TIMEOUT = 10.0  # one resume, connection to welcome
STILL_ATTACHED = "live on another transport"  # the old transport's drop not yet seen: try again


def log(msg: str) -> None:
    print(f"[nodes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mmm(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(min(values))} / **{fmt.format(statistics.median(values))}** / {fmt.format(max(values))}"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def host_busy() -> float:
    """CPU seconds the whole host spent busy (all cores, anyone's work; not idle, not iowait)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0))


def client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Pg:
    """The private PostgreSQL, its postmaster's tree CPU, and a fresh database per use."""

    def __init__(self) -> None:
        self.server = PgServer(settings={"max_connections": "50"})  # PostgreSQL's defaults otherwise
        pid = int((self.server.data / "postmaster.pid").read_text().split()[0])
        self.mon = bench.TreeMonitor(pid)

    def fresh_url(self) -> str:
        return self.server.url(self.server.create_database())

    def stop(self) -> None:
        self.server.stop()


class Nodes:
    """Supervisor processes (or the SDK runtime), started together, stopped together."""

    def __init__(self, name: str, templates: list[str], log_dir: Path) -> None:
        self.procs = [bench.ServerProc(f"{name}-{i}", t, log_dir) for i, t in enumerate(templates)]
        self.started: list[bench.ServerProc] = []

    def start(self) -> Nodes:
        for p in self.procs:
            self.started.append(p)
            p.start(START_TIMEOUT)
        return self

    @property
    def urls(self) -> list[str]:
        return [p.url for p in self.procs]

    def cpu(self) -> float:
        return float(sum(bench.TreeMonitor(p.pid).cpu() for p in self.procs))

    def own_cpu(self) -> list[float]:
        """Each top process's own CPU (all its threads; not its workers')."""
        return [time.clock_gettime(bench._process_cpu_clock(p.pid)) for p in self.procs]  # noqa: SLF001

    def exited(self) -> list[str]:
        return [f"{p.name} exited {p.proc.returncode}" for p in self.procs
                if p.proc is not None and p.proc.poll() is not None]

    def stop(self) -> None:
        for p in self.started:
            with contextlib.suppress(Exception):
                p.stop()
        self.started.clear()


def supervisor(state: str, node: str | None) -> str:
    t = f"{shlex.quote(str(SUPERVISOR))} run --port 0 {REUSE} {{agents}}"
    if state:
        t += f" --state-url {shlex.quote(state)} --node-id {node}"
    return t


# -- throughput -------------------------------------------------------------------------------

async def throughput(nodes: Nodes, pg: Pg | None, a: argparse.Namespace) -> dict[str, Any]:
    urls = nodes.urls
    conns = [await bench.Client.open("raw", urls[j % len(urls)]) for j in range(a.conns)]
    done = errors = 0
    counting = False  # jobs are counted while the CPU window is open
    stop = asyncio.Event()
    t_win0 = time.perf_counter() + a.tp_warmup
    t_win1 = t_win0 + a.tp_seconds

    async def submitter(k: int) -> None:
        nonlocal done, errors
        c = conns[k % len(conns)]
        i = 0
        while not stop.is_set():
            try:
                ok, _ = await c.run("noop", {"k": k, "i": i})
            except Exception:  # noqa: BLE001 - counted
                ok = False
            errors += not ok
            if ok and counting:
                done += 1
            i += 1

    tasks = [asyncio.create_task(submitter(k)) for k in range(a.submitters)]
    try:
        await asyncio.sleep(max(0.0, t_win0 - time.perf_counter()))
        s0, p0, c0, h0, o0 = nodes.cpu(), pg.mon.cpu() if pg else 0.0, client_cpu(), host_busy(), nodes.own_cpu()
        w0, counting = time.perf_counter(), True
        await asyncio.sleep(max(0.0, t_win1 - time.perf_counter()))
        w1, counting, n = time.perf_counter(), False, done
        s1, p1, c1, h1, o1 = nodes.cpu(), pg.mon.cpu() if pg else 0.0, client_cpu(), host_busy(), nodes.own_cpu()
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=30)
        for t in pending:
            t.cancel()
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        for c in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), 10)
    wall = w1 - w0
    per = max(n, 1) / 1000  # CPU seconds per job -> ms
    return {"jobs_per_s": n / wall, "jobs": n, "errors": errors, "window_s": wall,
            "server_ms": (s1 - s0) / per, "pg_ms": (p1 - p0) / per, "client_ms": (c1 - c0) / per,
            "cores_busy": ((s1 - s0) + (p1 - p0) + (c1 - c0)) / wall, "host_busy": (h1 - h0) / wall,
            "process_cores": max((b - a) / wall for a, b in zip(o0, o1)),
            "exited": nodes.exited()}


# -- resume ---------------------------------------------------------------------------------

def hello(resume: dict[str, Any] | None = None) -> str:
    payload: dict[str, Any] = {"client": {"name": "bench-nodes", "version": "1"},
                               "auth": {"scheme": "bearer", "token": ""},
                               "capabilities": {"encodings": ["json"], "features": ["ack"]}}
    if resume:
        payload["resume"] = resume
    return json.dumps({"arcp": "1.1", "id": bench.new_ulid(), "type": "session.hello", "payload": payload})


async def recv(ws: Any) -> dict[str, Any]:
    f: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), RESUME_TIMEOUT))
    return f


async def drop(ws: Any) -> None:
    ws.transport.abort()  # a network cut: no close frame
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.wait_closed(), 5)


class Resumer:
    def __init__(self) -> None:
        self.sid = self.token = ""
        self.last = 0
        self.refused = 0  # resumes refused because the cut was not seen yet (tried again)

    async def open(self, url: str) -> Any:
        """A session on `url` with one finished job; its connection."""
        ws = await asyncio.wait_for(connect(url, compression=None), RESUME_TIMEOUT)
        await ws.send(hello())
        w = await recv(ws)
        if w["type"] != "session.welcome":
            raise RuntimeError(f"hello refused: {w}")
        self.sid, self.token = w["payload"]["session_id"], w["payload"]["resume_token"]
        await ws.send(json.dumps({"arcp": "1.1", "id": bench.new_ulid(), "type": "job.submit", "session_id": self.sid,
                                  "payload": {"agent": "noop", "input": {"resume": 1}, "lease_request": {}}}))
        while True:
            f = await recv(ws)
            self.last = max(self.last, f.get("event_seq") or 0)
            if f["type"] == "job.result":
                return ws
            if f["type"] in ("job.error", "session.error"):
                raise RuntimeError(f"the job failed: {f}")

    async def resume(self, url: str) -> tuple[Any, float, float]:
        """Resumed on `url`: the connection, ms from opening it to the welcome, ms of that in
        the WebSocket opening handshake."""
        deadline = time.monotonic() + RESUME_TIMEOUT
        while True:
            t0 = time.perf_counter()
            ws = await asyncio.wait_for(connect(url, compression=None), RESUME_TIMEOUT)
            t1 = time.perf_counter()
            await ws.send(hello({"session_id": self.sid, "resume_token": self.token, "last_event_seq": self.last}))
            w = await recv(ws)
            t2 = time.perf_counter()
            if w["type"] == "session.welcome":
                self.token = w["payload"]["resume_token"]
                return ws, (t2 - t0) * 1e3, (t1 - t0) * 1e3
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
            why = str(w.get("payload"))
            if STILL_ATTACHED not in why or time.monotonic() > deadline:
                raise RuntimeError(f"resume refused: {why[:300]}")
            self.refused += 1
            await asyncio.sleep(0.02)


async def resume_latency(nodes: Nodes, a: argparse.Namespace) -> dict[str, Any]:
    url_a, url_b = nodes.urls[:2]
    r = Resumer()
    ws = await r.open(url_a)
    here, there = url_a, url_b
    cross: list[float] = []
    same: list[float] = []
    handshake: list[float] = []
    try:
        for i in range(a.resume_warmup + a.resumes):
            for kind in ("cross", "same"):
                await drop(ws)
                await asyncio.sleep(a.resume_settle)  # the process sees the cut
                if kind == "cross":
                    here, there = there, here
                ws, ms, hs_ms = await r.resume(here)
                if i >= a.resume_warmup:
                    (cross if kind == "cross" else same).append(ms)
                    handshake.append(hs_ms)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 5)
    return {"cross_p50": pct(cross, 0.5), "cross_p90": pct(cross, 0.9), "same_p50": pct(same, 0.5),
            "same_p90": pct(same, 0.9), "handshake_p50": pct(handshake, 0.5), "n": len(cross),
            "refused": r.refused, "exited": nodes.exited()}


# -- one repetition ---------------------------------------------------------------------------

def on_pg(pg: Pg, k: int) -> list[str]:
    """k supervisors on a fresh database of their own."""
    url = pg.fresh_url()
    return [supervisor(url, f"node{i}") for i in range(k)]


def throughput_configs(n_nodes: int, pg: Pg) -> list[tuple[str, Callable[[], list[str]]]]:
    """(name, what makes its templates): a database is made when its config runs."""
    return [
        ("sdk", lambda: [bench.DEFAULT_SDK_CMD]),
        ("sqlite-1", lambda: [supervisor("", None)]),
        ("pg-1", lambda: on_pg(pg, 1)),
        (f"pg-{n_nodes}", lambda: on_pg(pg, n_nodes)),
    ]


async def one_rep(rep: int, pg: Pg, a: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"throughput": {}, "store_us": {}}
    for name, templates in throughput_configs(a.nodes, pg):
        nodes = Nodes(f"r{rep}-{name}", templates(), log_dir)
        try:
            await asyncio.to_thread(nodes.start)
            r = await asyncio.wait_for(throughput(nodes, pg if name.startswith("pg") else None, a), PHASE_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
        finally:
            await asyncio.to_thread(nodes.stop)
        out["throughput"][name] = r
        log(f"rep {rep + 1} throughput {name}: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v
                                                              for k, v in r.items()}))

    nodes = Nodes(f"r{rep}-resume", on_pg(pg, 2), log_dir)
    try:
        await asyncio.to_thread(nodes.start)
        r = await asyncio.wait_for(resume_latency(nodes, a), PHASE_TIMEOUT)
    except Exception as e:  # noqa: BLE001
        r = {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        await asyncio.to_thread(nodes.stop)
    out["resume"] = r
    log(f"rep {rep + 1} resume: " + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))

    with tempfile.TemporaryDirectory(prefix="arcp-nodes-store-") as tmp:
        stores = [
            ("sqlite, in memory", lambda: SqliteStore(None)),
            ("sqlite, on disk (WAL, synchronous=NORMAL)", lambda: SqliteStore(str(Path(tmp) / "state"))),
            ("postgresql, synchronous_commit=on", lambda: PostgresStore(pg.fresh_url(), node_id="bench")),
            ("postgresql, synchronous_commit=off", lambda: PostgresStore(
                pg.server.url(pg.server.create_database(), options="-c%20synchronous_commit%3Doff"),
                node_id="bench")),
        ]
        for name, make in stores:
            try:
                (us,) = await asyncio.wait_for(store_cost.measure(make, a.store_jobs, 1, 4), PHASE_TIMEOUT)
                out["store_us"][name] = us
            except Exception as e:  # noqa: BLE001
                out["store_us"][name] = None
                log(f"rep {rep + 1} store {name}: {type(e).__name__}: {e}")
    log(f"rep {rep + 1} store µs/job: " + json.dumps({k: v and round(v) for k, v in out["store_us"].items()}))
    return out


# -- the report -------------------------------------------------------------------------------

LEVEL = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) ")
STAMP = re.compile(r"^\d{4}-\d\d-\d\d \S+ ")  # the log line's date and time
HANDED = "handed over to node"


def stderr_findings(log_dir: Path) -> tuple[list[str], int]:
    """The servers' stderr: lines that look wrong (warnings, errors, tracebacks, a node lost or
    fenced), counted by text, and how many handovers the processes logged."""
    seen: dict[str, int] = {}
    handed = 0
    for f in sorted(log_dir.glob("bench-*.stderr")):
        who = re.sub(r"^bench-r\d+-|-[^-]+\.stderr$", "", f.name)  # e.g. pg-2-1: pg-2's second process
        for line in f.read_text(errors="replace").splitlines():
            handed += HANDED in line
            if LEVEL.match(line) or "Traceback" in line or re.search(r"\b(lost|fenced)\b", line):
                key = f"{who}: {re.sub(r'[0-9]+', 'N', STAMP.sub('', line))[:240]}"
                seen[key] = seen.get(key, 0) + 1
    return [f"{n}x {k}" for k, n in sorted(seen.items(), key=lambda kv: -kv[1])], handed


def report(reps: list[dict[str, Any]], a: argparse.Namespace, facts: dict[str, Any], findings: list[str],
           handed: int) -> str:
    n = a.nodes
    pgn = f"pg-{n}"
    out: list[str] = []
    p = out.append

    def tp(name: str, key: str) -> list[float]:
        return [r["throughput"][name][key] for r in reps if key in r["throughput"].get(name, {})]

    p(f"## Several processes on one PostgreSQL (`scripts/bench --nodes {n}`)\n")
    p(f"{len(reps)} repetitions, min / **median** / max; {facts['time_utc']}, {facts['nproc']} cores "
      f"({facts['cpu_model']}), {facts['mem_total_gib']} GiB, load average at start "
      f"{facts['loadavg_start'][0]:.2f}. PostgreSQL {pg_version()} on this host, its defaults "
      f"(fsync, synchronous_commit on).\n")
    p(f"### Throughput, reused workers: {a.submitters} submitters on {a.conns} connections, `noop` jobs, "
      f"{a.tp_seconds:g} s after {a.tp_warmup:g} s of warm-up\n")
    p("| server | jobs/s | CPU ms per job: supervisors (with workers) | PostgreSQL | client "
      "| cores busy: all these | the busiest server process alone | the host | errors |")
    p("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    names = {"sdk": "SDK in-process runtime (reference, no store)",
             "sqlite-1": "1 process, SQLite (default store, in memory)",
             "pg-1": "1 process, PostgreSQL",
             pgn: f"{n} processes, PostgreSQL ({a.conns // n} connections each)"}
    for name, label in names.items():
        errs = [r["throughput"].get(name, {}).get("errors", r["throughput"].get(name, {}).get("error", "-"))
                for r in reps]
        pg_ms = mmm(tp(name, "pg_ms"), "{:.2f}") if name.startswith("pg") else "-"
        p(f"| {label} | {mmm(tp(name, 'jobs_per_s'))} | {mmm(tp(name, 'server_ms'), '{:.2f}')} | {pg_ms} | "
          f"{mmm(tp(name, 'client_ms'), '{:.2f}')} | {mmm(tp(name, 'cores_busy'), '{:.2f}')} | "
          f"{mmm(tp(name, 'process_cores'), '{:.2f}')} | {mmm(tp(name, 'host_busy'), '{:.2f}')} | "
          f"{', '.join(str(e)[:60] for e in errs)} |")

    def ratio(num: str, den: str) -> list[float]:
        return [r["throughput"][num]["jobs_per_s"] / r["throughput"][den]["jobs_per_s"] for r in reps
                if "jobs_per_s" in r["throughput"].get(num, {}) and "jobs_per_s" in r["throughput"].get(den, {})]

    two, pgsq = ratio(pgn, "pg-1"), ratio("pg-1", "sqlite-1")
    p("\n| ratio, per repetition | min / **median** / max |\n| --- | --- |")
    p(f"| {n} processes / 1 process, both PostgreSQL | {mmm(two, '{:.2f}')} |")
    p(f"| 1 process: PostgreSQL / SQLite | {mmm(pgsq, '{:.2f}')} |")
    p(f"| 1 process PostgreSQL / SDK | {mmm(ratio('pg-1', 'sdk'), '{:.2f}')} |")
    if two:
        g = statistics.median(two)
        busy1, busyn = statistics.median(tp("pg-1", "cores_busy")), statistics.median(tp(pgn, "cores_busy"))
        host1 = statistics.median(tp("pg-1", "host_busy"))
        p(f"\n**{n} processes gave {g:.2f}x the jobs/s of one (median). On this {facts['nproc']}-core machine "
          f"the processes share the same cores, so no gain from more processes is expected.**")
        hostn, one = statistics.median(tp(pgn, "host_busy")), statistics.median(tp("pg-1", "process_cores"))
        if g >= 1.1:
            p(f"Measured: a gain all the same. A supervisor runs its event loop on one thread: the busiest "
              f"process used {one:.2f} of a core alone, and with its workers, the client and PostgreSQL "
              f"{busy1:.2f} cores; with {n} processes these used {busyn:.2f} (the whole host, other work included: "
              f"{host1:.2f} and {hostn:.2f} of {facts['nproc']}). So the second process found CPU the first did not "
              f"use, on the same {facts['nproc']} cores, and with them busy that is as far as it goes here. Nothing "
              f"in this says what a host with cores to spare, or processes on machines of their own, would give.\n")
        elif g <= 0.9:
            p(f"Measured: a loss ({busy1:.2f} cores busy with one process, {busyn:.2f} with {n}): the cores were "
              f"already taken, and {n} processes add their own work on the same cores.\n")
        else:
            p(f"Measured: none, as expected ({busy1:.2f} cores busy with one process, {busyn:.2f} with {n}).\n")

    p(f"### The store's cost per job (store_cost.py: insert, 4 frames, finish, one sync; {a.store_jobs} jobs)\n")
    p("| store | µs per job | / SQLite in memory | / SQLite on disk |\n| --- | --- | --- | --- |")
    keys = list(reps[0]["store_us"]) if reps else []
    for k in keys:
        vals = [r["store_us"][k] for r in reps if r["store_us"].get(k)]
        rm = [r["store_us"][k] / r["store_us"][keys[0]] for r in reps if r["store_us"].get(k) and r["store_us"].get(keys[0])]
        rd = [r["store_us"][k] / r["store_us"][keys[1]] for r in reps if r["store_us"].get(k) and r["store_us"].get(keys[1])]
        p(f"| {k} | {mmm(vals)} | {mmm(rm, '{:.1f}')} | {mmm(rd, '{:.1f}')} |")

    res = [r["resume"] for r in reps if "cross_p50" in r["resume"]]
    p(f"\n### Resume latency: opening a connection to the session.welcome of a resume ({a.resumes} resumes of each "
      f"kind per repetition, after {a.resume_warmup} of warm-up; each the p50 or p90 of one repetition)\n")
    p("| resume | p50 ms | p90 ms |\n| --- | --- | --- |")
    p(f"| on the other process (the session handed over) | {mmm([x['cross_p50'] for x in res], '{:.2f}')} | "
      f"{mmm([x['cross_p90'] for x in res], '{:.2f}')} |")
    p(f"| on the same process | {mmm([x['same_p50'] for x in res], '{:.2f}')} | "
      f"{mmm([x['same_p90'] for x in res], '{:.2f}')} |")
    p(f"| of which the WebSocket opening handshake (both kinds) | {mmm([x['handshake_p50'] for x in res], '{:.2f}')} | |")
    refused = [x.get("refused", 0) for x in res]
    errs = [r["resume"]["error"] for r in reps if "error" in r["resume"]]
    p(f"\nResumes refused as still attached and tried again ({a.resume_settle * 1000:.0f} ms after the cut): "
      f"{refused}; failed repetitions: {errs or 'none'}.\n")
    exited = [e for r in reps for x in (*r["throughput"].values(), r["resume"]) for e in x.get("exited", [])]
    p(f"Servers that exited during a measurement: {exited or 'none'}.")
    p(f"Handovers the processes logged: {handed} ({(a.resumes + a.resume_warmup) * len(reps)} expected).")
    p(f"Servers' stderr, lines of level WARNING or above, tracebacks, a node lost or fenced: {len(findings)} distinct"
      + ("" if not findings else ":\n\n" + "\n".join(f"    {x}" for x in findings[:15])))
    return "\n".join(out) + "\n"


def pg_version() -> str:
    from tests.postgres import bin_dir

    return bin_dir().parent.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="short windows, few resumes, fewer store jobs")
    ap.add_argument("--submitters", type=int, default=32)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--tp-seconds", type=float, default=10.0)
    ap.add_argument("--tp-warmup", type=float, default=1.0)
    ap.add_argument("--resumes", type=int, default=50)
    ap.add_argument("--resume-warmup", type=int, default=5)
    ap.add_argument("--resume-settle", type=float, default=0.05, help="seconds after a cut before the resume")
    ap.add_argument("--store-jobs", type=int, default=500)
    ap.add_argument("--out", help="write every repetition's figures here (JSON)")
    ap.add_argument("--log-dir", help="keep the servers' stderr here (default: a temporary directory)")
    ap.add_argument("--report", metavar="FILE", help="print the report of a saved --out file again, run nothing")
    a = ap.parse_args()
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        print(report(saved["reps"], argparse.Namespace(**saved["args"]), saved["facts"], saved["stderr"],
                     saved["handovers"]), end="")
        return 0
    if a.nodes < 2 or a.reps < 1 or a.conns < a.nodes:
        ap.error("--nodes must be >= 2, --reps >= 1, --conns >= --nodes")
    if a.quick:
        a.tp_seconds, a.tp_warmup, a.resumes, a.resume_warmup, a.store_jobs = 3.0, 0.5, 20, 2, 200
    if not (BENCH / "bench.py").is_file():
        sys.exit(f"the benchmark harness is missing: expected {BENCH / 'bench.py'}")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # the finally blocks run
        signal.signal(sig, lambda *_: sys.exit(1))
    facts = bench.machine_facts()
    tmp = None
    if a.log_dir:
        log_dir = Path(a.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="arcp-nodes-logs-")
        log_dir = Path(tmp.name)
    reps: list[dict[str, Any]] = []
    try:
        pg = Pg()
        try:
            for rep in range(a.reps):
                reps.append(asyncio.run(one_rep(rep, pg, a, log_dir)))
        finally:
            pg.stop()
        findings, handed = stderr_findings(log_dir)
    finally:
        bench._kill_all_live()  # noqa: SLF001 - any server still up after an interruption
        if tmp is not None:
            tmp.cleanup()
    facts["loadavg_end"] = os.getloadavg()
    if a.out:
        Path(a.out).write_text(json.dumps({"facts": facts, "args": vars(a), "reps": reps, "stderr": findings,
                                           "handovers": handed},
                                          indent=1, default=str))
    print(report(reps, a, facts, findings, handed), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
