"""What the shell client shows: rich on a terminal, plain text elsewhere.

Everything an agent or the server chose (log messages, results, ids) is escaped before
it is shown, so that no control character of theirs reaches the user's terminal; off a
terminal nothing here writes a control character at all.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TaskProgressColumn, TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

USAGE_KEY = "x-vendor.arcp-supervisor.usage"
LIMITS_KEY = "x-vendor.arcp-supervisor.limits"

# C0 but tab and newline, DEL, C1, and the bidirectional overrides and marks.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# In JSON text every C0 character is escaped already; these are not (ensure_ascii=False).
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean(text: Any, *, one_line: bool = False) -> str:
    """`text` made safe to print: control characters shown as escapes."""
    s = text if isinstance(text, str) else str(text)
    return (_UNSAFE_ONE_LINE if one_line else _UNSAFE).sub(_escape, s)


def dump_json(obj: Any, *, indent: int | None = None) -> str:
    """JSON text for people and pipes alike: non-ASCII kept, anything invisible escaped."""
    text = json.dumps(obj, ensure_ascii=False, indent=indent,
                      separators=None if indent else (",", ":"))
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def is_terminal(stream: IO[Any]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def console_for(stream: IO[Any]) -> Console:
    """A rich console on a terminal stream; markup off (nothing shown is ours to style)."""
    return Console(file=stream, force_terminal=True, highlight=False, emoji=False, markup=False)


class Lines:
    """Lines on stderr: through rich on a terminal (above a live progress bar), plain
    text otherwise."""

    def __init__(self, stream: IO[Any] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream)
        self.console: Console | None = console_for(self.stream) if self.tty else None

    def say(self, text: str, style: str | None = None) -> None:
        if self.console is not None:
            self.console.print(Text(text, style=style or ""), soft_wrap=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()


_LEVEL_STYLE = {"debug": "dim", "info": "", "warn": "yellow", "warning": "yellow", "error": "bold red"}


class _Units(ProgressColumn):
    """`3/10 items`, or `3 items` when the total is not known."""

    def render(self, task: Task) -> Text:
        units = task.fields.get("units") or ""
        done = int(task.completed)
        shown = f"{done}/{int(task.total)}" if task.total is not None else f"{done}"
        return Text(f"{shown} {units}".rstrip())


class JobView:
    """One job as `submit` and `watch` show it: its id, its log and status events on stderr,
    and on a terminal a live progress bar fed by its `progress` events."""

    def __init__(self, lines: Lines, *, bar: bool) -> None:
        self.lines = lines
        self.bar = bar and lines.console is not None
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.label = ""

    def start(self, job_id: str, agent: str, status: str | None = None) -> None:
        self.label = clean(agent, one_line=True)
        tail = f" ({clean(status, one_line=True)})" if status else ""
        self.lines.say(f"job {clean(job_id, one_line=True)} {self.label}{tail}", "bold")
        if self.bar and self.lines.console is not None:
            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                _Units(), TimeElapsedColumn(),
                console=self.lines.console, transient=False, redirect_stdout=False, redirect_stderr=False,
                refresh_per_second=8)
            self.task = self.progress.add_task(self.label, total=None, units="")
            self.progress.start()

    def _say(self, text: str, style: str | None = None) -> None:
        if self.progress is not None:
            self.progress.console.print(Text(text, style=style or ""), soft_wrap=True)
        else:
            self.lines.say(text, style)

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        body = ev.get("body") if isinstance(ev.get("body"), dict) else {}
        assert isinstance(body, dict)
        if kind == "log":
            level = str(body.get("level", "info"))
            self._say(f"{clean(level, one_line=True):<5} {clean(body.get('message', ''))}",
                      _LEVEL_STYLE.get(level))
        elif kind == "status":
            phase = clean(body.get("phase", ""), one_line=True)
            msg = body.get("message")
            text = f"{phase}: {clean(msg, one_line=True)}" if msg else phase
            self._say(f"[{text}]", "cyan")
            if self.progress is not None and self.task is not None:
                self.progress.update(self.task, description=f"{self.label} {text}")
        elif kind == "progress" and self.progress is not None and self.task is not None:
            current, total = body.get("current"), body.get("total")
            fields: dict[str, Any] = {}
            if isinstance(body.get("units"), str):
                fields["units"] = clean(body["units"], one_line=True)
            message = body.get("message")
            desc = f"{self.label} {clean(message, one_line=True)}" if isinstance(message, str) and message \
                else self.label
            self.progress.update(self.task, completed=current if isinstance(current, int) else 0,
                                 total=total if isinstance(total, int) and total > 0 else None,
                                 description=desc, **fields)

    def stop(self, *, success: bool = False) -> None:
        """The bar's last state stays on the screen (full when the job succeeded)."""
        if self.progress is None:
            return
        if success and self.task is not None:
            task = self.progress.tasks[0]
            if task.total is not None:
                self.progress.update(self.task, completed=task.total)
        self.progress.stop()
        self.progress = None

    def summary(self, usage: Any) -> None:
        """A terminal's one line of what the job used, when the server measured it."""
        if self.lines.console is None or not isinstance(usage, dict):
            return
        parts = []
        if isinstance(usage.get("wall_s"), (int, float)):
            parts.append(f"{usage['wall_s']:.2f} s")
        cpu = _num(usage.get("cpu_user_s")) + _num(usage.get("cpu_sys_s"))
        if "cpu_user_s" in usage or "cpu_sys_s" in usage:
            parts.append(f"cpu {cpu:.2f} s")
        if isinstance(usage.get("memory_peak_mb"), (int, float)):
            parts.append(f"peak {usage['memory_peak_mb']:.1f} MB")
        if parts:
            self.lines.say(" · ".join(parts), "dim")


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


# -- tables --------------------------------------------------------------------------
def plain_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] = ()) -> str:
    """Columns aligned with spaces, like ps: no box drawing, no control characters."""
    body = [[clean(c, one_line=True) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in body:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            out.append(c.rjust(w) if i < len(right) and right[i] else c.ljust(w))
        return "  ".join(out).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in body])


def rich_table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] = (),
               title: str | None = None, styles: Sequence[str | None] = ()) -> Table:
    table = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if i < len(right) and right[i] else "left",
                         no_wrap=i == 0, overflow="fold")
    for n, r in enumerate(rows):
        table.add_row(*[clean(c, one_line=True) for c in r], style=styles[n] if n < len(styles) else None)
    return table


def _when(ts: Any) -> str:
    """An ISO timestamp as local time, shorter (the date only when it is not today)."""
    if not isinstance(ts, str):
        return ""
    try:
        dt = datetime.fromisoformat(ts.replace("Z", "+00:00")).astimezone()
    except ValueError:
        return ts
    if dt.date() == datetime.now().astimezone().date():
        return dt.strftime("%H:%M:%S")
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def _age(ts: Any, now: float) -> float | None:
    if not isinstance(ts, str):
        return None
    try:
        return max(0.0, now - datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


JOBS_STATUS_STYLE = {"running": "green", "pending": "yellow", "success": "", "error": "red",
                     "cancelled": "magenta", "timed_out": "red"}


def jobs_rows(entries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """`jobs`: id, agent, status, when submitted; the principal too when the server says
    (an admin's listing)."""
    with_principal = any("principal" in e for e in entries)
    headers = ["JOB", "AGENT", "STATUS", "SUBMITTED"] + (["PRINCIPAL"] if with_principal else [])
    rows = []
    for e in entries:
        row = [str(e.get("job_id", "")), str(e.get("agent", "")), str(e.get("status", "")),
               _when(e.get("submitted_at") or e.get("created_at"))]
        if with_principal:
            row.append(str(e.get("principal", "")))
        rows.append(row)
    return headers, rows


# -- top ------------------------------------------------------------------------------
def limits_of(entry: dict[str, Any]) -> dict[str, float]:
    """A job's limits as far as its list entry tells: the limits capability of its lease
    (its effective values when the client asked), then an explicit limits field."""
    out: dict[str, float] = {}
    lease = entry.get("lease")
    cap = lease.get(LIMITS_KEY) if isinstance(lease, dict) else None
    if isinstance(cap, list):
        for item in cap:
            if isinstance(item, str) and ":" in item:
                k, _, v = item.partition(":")
                try:
                    out[k] = float(v)
                except ValueError:
                    pass
    for source in (entry.get(LIMITS_KEY), (entry.get(USAGE_KEY) or {}).get("limits")
                   if isinstance(entry.get(USAGE_KEY), dict) else None):
        if isinstance(source, dict):
            out.update({k: float(v) for k, v in source.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return out


class TopSampler:
    """CPU use between two refreshes of `top`, per job."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, float]] = {}

    def cpu_percent(self, job_id: str, cpu_s: float | None, now: float, wall_s: float | None) -> float | None:
        """Since the last refresh; on the first, the average over the job's life so far."""
        if cpu_s is None:
            return None
        prev = self.last.get(job_id)
        self.last[job_id] = (now, cpu_s)
        if prev is None or now <= prev[0]:
            return cpu_s / wall_s * 100 if wall_s else None
        return max(0.0, (cpu_s - prev[1]) / (now - prev[0]) * 100)

    def forget_except(self, ids: set[str]) -> None:
        self.last = {k: v for k, v in self.last.items() if k in ids}


def _against(value: float | None, limit: float | None, unit: str, fmt: str = "{:.1f}") -> str:
    if value is None:
        return "" if limit is None else f"- / {limit:g}{unit}"
    shown = fmt.format(value) + unit
    if limit:
        return f"{shown} / {limit:g}{unit} ({value / limit * 100:.0f}%)"
    return shown


def top_rows(entries: Sequence[dict[str, Any]], sampler: TopSampler,
             now: float | None = None) -> tuple[list[str], list[list[str]], list[bool], list[str | None]]:
    """`top`: running jobs first, then those waiting to start, with what each uses against
    its limits."""
    now = time.time() if now is None else now
    mono = time.monotonic()
    with_principal = any("principal" in e for e in entries)
    headers = ["JOB"] + (["PRINCIPAL"] if with_principal else []) + \
        ["AGENT", "STATUS", "TIME", "CPU%", "CPU", "MEMORY", "PROCS"]
    right = [False] * (2 if with_principal else 1) + [False, False, True, True, True, True, True]
    ordered = sorted(entries, key=lambda e: 0 if e.get("status") == "running" else 1)
    rows, styles = [], []
    for e in ordered:
        jid = str(e.get("job_id", ""))
        usage = e.get(USAGE_KEY) if isinstance(e.get(USAGE_KEY), dict) else {}
        assert isinstance(usage, dict)
        lim = limits_of(e)
        running = e.get("status") == "running"
        cpu: float | None = None
        if running and ("cpu_user_s" in usage or "cpu_sys_s" in usage):
            cpu = _num(usage.get("cpu_user_s")) + _num(usage.get("cpu_sys_s"))
        wall = usage.get("wall_s")
        wall_s = _num(wall) if isinstance(wall, (int, float)) else None
        pct = sampler.cpu_percent(jid, cpu, mono, wall_s) if running else None
        mem = usage.get("memory_mb", usage.get("memory_peak_mb"))
        mem_v = _num(mem) if isinstance(mem, (int, float)) else None
        procs = usage.get("procs", usage.get("procs_peak"))
        elapsed = wall_s if wall_s is not None else _age(e.get("created_at") or e.get("submitted_at"), now)
        row = [jid] + ([str(e.get("principal", ""))] if with_principal else []) + [
            str(e.get("agent", "")), "running" if running else "queued", duration(elapsed),
            "" if pct is None else f"{pct:.0f}%",
            _against(cpu, lim.get("cpu_sec"), "s") if running else "",
            _against(mem_v, lim.get("memory_mb"), "M") if running else "",
            (str(procs) + (f" / {lim['max_procs']:g}" if lim.get("max_procs") else ""))
            if isinstance(procs, int) and running else "",
        ]
        rows.append(row)
        styles.append(None if running else "dim")
    sampler.forget_except({str(e.get("job_id", "")) for e in ordered})
    return headers, rows, right, styles


def top_title(url: str, entries: Sequence[dict[str, Any]]) -> str:
    running = sum(1 for e in entries if e.get("status") == "running")
    return (f"arcp-supervisor top  {clean(url, one_line=True)}  {time.strftime('%H:%M:%S')}  "
            f"{running} running, {len(entries) - running} queued")
