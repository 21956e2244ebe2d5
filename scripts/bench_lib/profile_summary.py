#!/usr/bin/env python3
"""Summarise a py-spy profile of arcp-supervisor taken by ../shared/bench/profile_server.py.

    python scripts/bench_lib/profile_summary.py PREFIX.json PREFIX.txt [--top N] [--rate HZ]

profile_server.py's own breakdown names the SDK runtime's functions; this one reads the
collapsed stacks (PREFIX.txt, py-spy raw format with --subprocesses) again and splits the
active samples of *our* process tree:

* by process: the supervisor (depth 1), the fork server (depth 2), job workers (depth 3+);
* by library of the leaf frame (self time): supervisor/, worker/, shared/, asyncio, websockets...;
* top leaf frames (self), with their source line, and top project functions anywhere on
  the stack (inclusive).

py-spy drops idle threads only where it can tell they are idle; a leaf whose source line is
a blocking wait (select, poll, Condition.wait, lock acquire, the worker pipe threads'
blocking recv) is counted as "waiting" and left out of the busy samples. Shares are of busy samples; "us/unit" scales a share by the measured
server CPU per unit (job, event, chunk) from PREFIX.json. The header compares busy samples /
rate with that measured CPU: py-spy misses short-lived job workers (it finds new processes
by polling) and falls behind on a busy tree of many processes, and then the shares lean
towards the long-lived supervisor and fork server. Prints markdown.
"""

from __future__ import annotations

import json
import linecache
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

PROC_RE = re.compile(r'^process (\d+):"(.*)"$')
FRAME_RE = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
PROJECT = ("supervisor/", "worker/", "shared/")
ENTRY_FILES = ("supervisor/cli.py", "supervisor/app.py", "worker/__main__.py")  # wrap everything: not shown
ROLES = {1: "supervisor process", 2: "fork server", 3: "job workers"}
ROOT = Path(__file__).resolve().parents[2]
SEARCH = [ROOT, Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])]
WAIT_RE = re.compile(r"\b(select|poll|epoll_wait|wait|acquire|recv_fds|sleep)\(")
# threads of ours that block in recv() for their next message: a sample there is a wait
BLOCKING_READERS = ("Channel._read_loop (worker/rpc_client.py", "Channel.first_job (worker/rpc_client.py")


def source_line(frame: str) -> str:
    """The source text of a 'func (file:line)' frame, if the file is found here."""
    m = FRAME_RE.match(frame)
    if not m or not m.group("line"):
        return ""
    for base in SEARCH:
        path = base / m.group("file")
        if path.is_file():
            return linecache.getline(str(path), int(m.group("line"))).strip()
    return ""


def is_wait(frame: str) -> bool:
    src = source_line(frame)
    if frame.startswith(BLOCKING_READERS) and ".recv(" in src:
        return True
    return bool(WAIT_RE.search(src))


def parse(path: Path) -> list[tuple[list[str], list[str], int]]:
    """[(process prefixes, frames, samples)] from py-spy's raw (collapsed) output."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        procs: list[str] = []
        frames: list[str] = []
        # process names hold quoted command lines that may contain ';' only in odd cases: split simply
        for part in stack.split(";"):
            if not frames and PROC_RE.match(part):
                procs.append(part)
            elif not frames and part.startswith("thread "):
                continue
            else:
                frames.append(part)
        out.append((procs, frames, int(n)))
    return out


def library(frame: str) -> str:
    m = FRAME_RE.match(frame)
    file = m.group("file") if m else frame
    if file.startswith("<frozen "):
        return "importlib (imports)" if "importlib" in file else file.strip("<>")
    for p in PROJECT:
        if file.startswith(p):
            return f"ours: {p}"
    if file in ("agents_bench.py",):
        return "agent code (agents_bench)"
    head = file.split("/", 1)[0]
    if head.endswith(".py"):
        head = head[:-3]
    return {"selectors": "asyncio", "selector_events": "asyncio", "socket": "socket / OS"}.get(head, head)


def short(frame: str) -> str:
    return frame if len(frame) <= 90 else frame[:87] + "..."


def summary(meta: dict[str, Any], stacks: list[tuple[list[str], list[str], int]], top: int,
            rate: float = 500.0) -> str:
    all_samples = sum(n for _, _, n in stacks)
    waits = Counter()
    busy = []
    for procs, frames, n in stacks:
        if frames and is_wait(frames[-1]):
            waits[f"{ROLES.get(min(len(procs), 3), 'unknown')}: {short(frames[-1])}"] += n
        else:
            busy.append((procs, frames, n))
    stacks = busy
    total = sum(n for _, _, n in stacks) or 1
    measured = meta.get("server_cpu_us_per_unit") or 0.0
    units = meta.get("units") or 1
    sampled = total / rate / units * 1e6  # busy samples as CPU per unit: a coverage check
    per_unit = measured  # rows: share of busy samples x measured CPU per unit
    unit = meta.get("unit", "unit")
    by_role: Counter[str] = Counter()
    by_lib: Counter[str] = Counter()
    by_role_lib: dict[str, Counter[str]] = {}
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for procs, frames, n in stacks:
        role = ROLES.get(min(len(procs), 3), "unknown")
        by_role[role] += n
        lib = library(frames[-1]) if frames else "(no frame)"
        by_lib[lib] += n
        by_role_lib.setdefault(role, Counter())[lib] += n
        if frames:
            leaf[f"{role}: {short(frames[-1])}"] += n
        seen = set()
        for f in frames:
            m = FRAME_RE.match(f)
            if m and m.group("file").startswith(PROJECT) and m.group("file") not in ENTRY_FILES:
                key = f"{m.group('func')} ({m.group('file')})"
                if key not in seen:
                    seen.add(key)
                    incl[key] += n

    def row(name: str, n: int) -> str:
        share = n / total
        return f"| {name} | {share * 100:.1f}% | {share * per_unit:.2f} |"

    m = meta.get("metrics") or {}
    lines = [
        f"### {meta.get('workload')} ({meta.get('driver')} driver): `{meta.get('server_cmd', '')[:90]}`",
        "",
        f"{meta.get('units')} {unit}s, server CPU {meta.get('server_cpu_s_while_profiled', 0):.2f} s over "
        f"{meta.get('wall_s', 0):.2f} s wall = **{measured:.1f} us per {unit}** measured (under py-spy). "
        f"{all_samples} samples at {rate:g} Hz, {sum(waits.values())} of them in a blocking wait (left out); "
        f"the {total} busy ones stand for {sampled:.1f} us per {unit} "
        f"({sampled / measured * 100 if measured else 0:.0f}% of the measured CPU: far from 100% means "
        "py-spy missed processes or fell behind, so read the shares with care).",
    ]
    key = {"latency": "p50_ms", "throughput": "jobs_per_s", "events": "events_per_s", "stream": "mib_per_s"}.get(
        str(meta.get("workload")))
    if key and key in m:
        lines[-1] += f" Measured while profiled: {key} = {m[key]:.4g}."
    lines += ["", f"| process | share | us/{unit} |", "|---|---|---|"]
    lines += [row(k, v) for k, v in by_role.most_common()]
    lines += ["", f"| library (self, leaf frame) | share | us/{unit} |", "|---|---|---|"]
    lines += [row(k, v) for k, v in by_lib.most_common(top)]
    for role, libs in by_role_lib.items():
        if by_role[role] / total >= 0.05:
            lines += ["", f"{role}, by library: " + ", ".join(
                f"{k} {v / total * 100:.1f}%" for k, v in libs.most_common(6))]
    lines += ["", f"| top leaf frames (self) | source line | share | us/{unit} |", "|---|---|---|---|"]
    for k, v in leaf.most_common(top):
        src = source_line(k.split(": ", 1)[1]).replace("|", "\\|")[:60]
        share = v / total
        lines.append(f"| {k} | `{src}` | {share * 100:.1f}% | {share * per_unit:.2f} |")
    if waits:
        lines += ["", "Left out as waits: " + ", ".join(
            f"{k} ({v / all_samples * 100:.1f}% of samples)" for k, v in waits.most_common(5))]
    lines += ["", f"| project functions (inclusive) | share | us/{unit} |", "|---|---|---|"]
    lines += [row(k, v) for k, v in incl.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    top, rate = 15, 500.0
    for flag in ("--top", "--rate"):
        if flag in argv:
            i = argv.index(flag)
            if flag == "--top":
                top = int(argv[i + 1])
            else:
                rate = float(argv[i + 1])
            del argv[i:i + 2]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    meta = json.loads(Path(argv[0]).read_text())
    sys.stdout.write(summary(meta, parse(Path(argv[1])), top, rate))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
