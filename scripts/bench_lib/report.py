#!/usr/bin/env python3
"""Ratio table of a scripts/bench run: ours and ours-reuse against the SDK baseline.

    python scripts/bench_lib/report.py bench-results/latest.json

Reads the JSON that ../shared/bench/bench.py writes (--out) and prints markdown: for each
server, workload/driver and metric, the absolute medians, the per-repetition ratio against
the baseline as min / median / max, and whether the project's target is met (on the median,
and on every repetition). Failed or erroneous runs are listed first. Exit status is 0 even
when targets are missed (it is a report, not a gate); 2 if the file is unusable.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

# (server, workload, metric, op, bound): ratio = server / baseline, per repetition
TARGETS: list[tuple[str, str, str, str, float]] = [
    ("ours", "latency", "p50_ms", "<=", 1.5),
    ("ours", "throughput", "jobs_per_s", ">=", 0.5),
    ("ours", "events", "events_per_s", ">=", 2.0),
    ("ours", "events", "server_cpu_us_per_event", "<=", 0.5),
    ("ours", "stream", "mib_per_s", ">=", 4.0),
    ("ours-reuse", "latency", "p50_ms", "<=", 1.0),
    ("ours-reuse", "throughput", "jobs_per_s", ">=", 1.0),
    ("ours-reuse", "events", "events_per_s", ">=", 2.0),
    ("ours-reuse", "events", "server_cpu_us_per_event", "<=", 0.5),
    ("ours-reuse", "stream", "mib_per_s", ">=", 4.0),
]
# shown for context, no target
EXTRA_METRICS: dict[str, list[str]] = {
    "latency": ["p99_ms", "server_cpu_ms_per_job"],
    "throughput": ["p50_ms", "server_cpu_ms_per_job"],
    "events": ["server_peak_rss_mb"],
    "stream": ["server_cpu_s", "server_peak_rss_mb"],
}


def fmt(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return str(v)
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def mmm(e: dict[str, Any] | None) -> str:
    if not e or "median" not in e:
        return "n/a"
    return f"{fmt(e['min'])} / **{fmt(e['median'])}** / {fmt(e['max'])}"


def holds(op: str, value: float, bound: float) -> bool:
    return value <= bound if op == "<=" else value >= bound


def problems(runs: list[dict[str, Any]]) -> list[str]:
    """One line per (server, workload/driver, kind of failure), with the repetitions it hit."""
    found: dict[tuple[str, str], list[str]] = {}
    for r in runs:
        rep = r.get("rep")
        rep_s = str(rep + 1) if isinstance(rep, int) else "?"
        where = f"{r.get('workload')}/{r.get('driver')} on {r.get('server')}"
        if "error" in r:
            found.setdefault((where, f"ERROR {r['error']}"), []).append(rep_s)
            continue
        m = r.get("metrics") or {}
        kinds = []
        if m.get("ok") is False:
            why = f"final_status={m.get('final_status')}"
            got, want = m.get("events_received"), m.get("events_expected")
            if isinstance(got, int) and isinstance(want, int) and got != want:
                if got > want and m.get("final_status") == "success":
                    why += (", more job.events than the agent's (e.g. a back_pressure status event; "
                            "the rate is unaffected)")
                    rep_s += f" (+{got - want})"
                else:
                    why += f", {got} events received for {want} expected"
            kinds.append(f"ok=false ({why})")
        if m.get("sha_ok") is False:
            kinds.append("sha256/order mismatch")
        if isinstance(m.get("errors"), int) and m["errors"]:
            kinds.append("failed jobs")
        if "server_exited" in r:
            kinds.append(f"server exited rc={r['server_exited']}")
        for k in kinds:
            found.setdefault((where, k), []).append(rep_s)
    return [f"{where}: {k} (rep {', '.join(reps)})" for (where, k), reps in found.items()]


def report(data: dict[str, Any]) -> str:
    meta = data["meta"]
    base = meta["baseline"]
    summ = data["summary"]
    ratios = data["ratios"]
    mach = meta["machine"]
    args = meta["args"]
    drivers_by_wl: dict[str, list[str]] = {}
    for wd in summ.get(base, {}):
        wl, _, drv = wd.partition("/")
        drivers_by_wl.setdefault(wl, []).append(drv)
    lines = [
        f"## ours / {base} ratios ({mach.get('time_utc')}, {mach.get('nproc')} cores "
        f"{mach.get('cpu_model')}, Python {mach.get('python')})",
        "",
        f"{args.get('reps')} repetitions{' (--quick sizes)' if args.get('quick') else ''}; "
        f"latency {args.get('latency_jobs')} jobs, throughput {args.get('tp_submitters')} submitters "
        f"x {args.get('tp_seconds')} s, events {args.get('events_n')}, stream {args.get('stream_mib')} MiB. "
        "Ratio = server / baseline per repetition, shown as min / **median** / max; "
        "'met' judges the median, 'every rep' the worst repetition.",
        "",
    ]
    bad = problems(data.get("runs", []))
    if bad:
        lines += ["**Failed runs:**", ""] + [f"- {b}" for b in bad] + [""]
    lines += [
        f"| server | workload/driver | metric | {base} median | server median | ratio min / median / max "
        "| target | met | every rep |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    met_count = total = 0
    for srv, wl, metric, op, bound in TARGETS:
        if srv not in meta["servers"]:
            continue
        for drv in drivers_by_wl.get(wl, []):
            wd = f"{wl}/{drv}"
            b = (summ.get(base, {}).get(wd) or {}).get(metric)
            s = (summ.get(srv, {}).get(wd) or {}).get(metric)
            r = (ratios.get(f"{srv}/{base}", {}).get(wd) or {}).get(metric)
            met = every = "n/a"
            if r and "median" in r:
                total += 1
                ok = holds(op, r["median"], bound)
                met_count += ok
                met = "yes" if ok else "**no**"
                worst = r["max"] if op == "<=" else r["min"]
                every = "yes" if holds(op, worst, bound) else "no"
            lines.append(
                f"| {srv} | {wd} | {metric} | {fmt(b['median']) if b and 'median' in b else 'n/a'} "
                f"| {fmt(s['median']) if s and 'median' in s else 'n/a'} | {mmm(r)} | {op} {bound:g}x "
                f"| {met} | {every} |"
            )
    lines += ["", f"Targets met (median): {met_count} of {total}.", "",
              "Context (no target):", "",
              f"| server | workload/driver | metric | {base} median | server median | ratio min / median / max |",
              "|---|---|---|---|---|---|"]
    for srv in [s for s in meta["servers"] if s != base]:
        for wl, metrics in EXTRA_METRICS.items():
            for drv in drivers_by_wl.get(wl, []):
                wd = f"{wl}/{drv}"
                for metric in metrics:
                    b = (summ.get(base, {}).get(wd) or {}).get(metric)
                    s = (summ.get(srv, {}).get(wd) or {}).get(metric)
                    r = (ratios.get(f"{srv}/{base}", {}).get(wd) or {}).get(metric)
                    if not (b or s):
                        continue
                    lines.append(
                        f"| {srv} | {wd} | {metric} | {fmt(b['median']) if b and 'median' in b else 'n/a'} "
                        f"| {fmt(s['median']) if s and 'median' in s else 'n/a'} | {mmm(r)} |")
    lines += environment_lines(data)
    return "\n".join(lines) + "\n"


# An agent environment's servers (scripts/bench --environments) against the same server on the
# default environment: (server, its default-environment twin, workload, metric, op, bound).
ENV_TARGETS = [
    ("ours-venv", "ours", "latency", "p50_ms", "<=", 1.10),
    ("ours-reuse-venv", "ours-reuse", "latency", "p50_ms", "<=", 1.10),
    ("ours-venv", "ours", "throughput", "jobs_per_s", ">=", 0.90),
    ("ours-reuse-venv", "ours-reuse", "throughput", "jobs_per_s", ">=", 0.90),
]


def environment_lines(data: dict[str, Any]) -> list[str]:
    """Each agent-environment server against its default-environment twin, per repetition
    (the same rep and driver of the same run): min / median / max of the ratio."""
    servers = data["meta"]["servers"]
    by: dict[tuple[str, str, int], dict[str, Any]] = {}
    for r in data.get("runs", []):
        if "error" not in r and isinstance(r.get("rep"), int):
            by[(r["server"], f"{r['workload']}/{r['driver']}", r["rep"])] = r.get("metrics") or {}
    rows = []
    for srv, twin, wl, metric, op, bound in ENV_TARGETS:
        if srv not in servers or twin not in servers:
            continue
        for wd in sorted({w for (s, w, _) in by if s == srv and w.startswith(wl + "/")}):
            ratios = sorted(by[(srv, wd, rep)][metric] / by[(twin, wd, rep)][metric]
                            for (s, w, rep) in by if s == srv and w == wd
                            and isinstance(by[(srv, wd, rep)].get(metric), (int, float))
                            and by.get((twin, wd, rep), {}).get(metric))
            if not ratios:
                continue
            median = statistics.median(ratios)
            rows.append(f"| {srv} / {twin} | {wd} | {metric} | {fmt(ratios[0])} / **{fmt(median)}** / "
                        f"{fmt(ratios[-1])} | {op} {bound:g}x | {'yes' if holds(op, median, bound) else '**no**'} |")
    if not rows:
        return []
    return ["", "Agent environments: a job on an agent's own venv against the same server's default "
            "environment, per repetition:", "",
            "| servers | workload/driver | metric | ratio min / median / max | target | met |",
            "|---|---|---|---|---|---|", *rows]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        data = json.loads(Path(argv[0]).read_text())
        text = report(data)
    except (OSError, ValueError, KeyError) as e:
        print(f"report.py: cannot read {argv[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
