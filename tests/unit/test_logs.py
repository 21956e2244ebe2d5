"""supervisor/logs.py: the text and JSON formats, the chatter filter, the relay of a child's
output; and the two settings (flags and config keys) that choose them."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from supervisor import logs
from supervisor.config import ConfigError, load_file
from supervisor.cli import build_config
from tests.unit.test_cli import invoke


def _record(name: str = "arcp.jobs", level: int = logging.INFO, msg: str = "job ended: %s", args: tuple = ("ok",),
            **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


def test_text_renders_fields_as_key_value() -> None:
    rec = _record(job_id="job_1", principal="alice smith", code=None, cpu_s=0.25, quote='a"b')
    line = logs.TextFormatter().format(rec)
    assert line.endswith(' INFO arcp.jobs: job ended: ok job_id=job_1 principal="alice smith" code=null '
                         'cpu_s=0.25 quote="a\\"b"'), line


def test_text_keeps_fields_on_the_first_line() -> None:
    rec = _record(msg="agent raised\n    | Traceback", args=(), job_id="job_1")
    first, rest = logs.TextFormatter().format(rec).split("\n", 1)
    assert first.endswith("agent raised job_id=job_1") and rest == "    | Traceback"


def _text_value_per_character(v: object) -> str:
    """The escaping rule spelt out one character at a time (what `_text_value` must match)."""
    if isinstance(v, str):
        if v and not any(c.isspace() or c in '"=\\' or not c.isprintable() for c in v):
            return v
        return orjson.dumps(v).decode()
    return orjson.dumps(v, default=str).decode()


TRICKY = ["", " ", "a b", "a\tb", 'say "hi"', "k=v", "=", "back\\slash", "\\", "\x00", "\x1b[2J", "\x7f", "\x85",
          "line\nbreak", "cr\r", "\u2028", "\u202e", "\u200b", "\ufeff", "\xa0", "\u3000", "\x1c", "caf\u00e9",
          "\u65e5\u672c", "\U0001f600", "\ud800", "job_01KB4ZQ1M7X3V5Y2Z9R8T6W4P0", "noop@1.0.0", "-", "a,b;c",
          "\u00e9=\u00e9", "x\u2009y", 0, 1.5, None, True, [1, "a b"], {"k": "v"}]


def _outcome(f: Callable[[object], str], v: object) -> str:
    try:
        return f(v)
    except TypeError as e:  # orjson refuses a lone surrogate
        return f"TypeError: {e}"


@pytest.mark.parametrize("value", TRICKY)
def test_text_values_are_escaped_as_ever(value: object) -> None:
    assert _outcome(logs._text_value, value) == _outcome(_text_value_per_character, value)


def test_text_value_escaping_agrees_for_every_character() -> None:
    """The characters a value may hold unquoted: the same set as the per-character rule's."""
    everything = "".join(map(chr, range(0x110000)))
    plain = {c for c in everything if c.isprintable()} - set(logs._QUOTED.findall(everything))
    assert plain == {c for c in everything if not (c.isspace() or c in '"=\\' or not c.isprintable())}
    assert " " not in plain and "\xa0" not in plain and "\u00e9" in plain
    sample = [c for c in everything[:0x3100:7]] + ["=", '"', "\\", " ", "\t"]
    got = [_outcome(logs._text_value, f"ab{c}cd") for c in sample]
    assert got == [_outcome(_text_value_per_character, f"ab{c}cd") for c in sample]


def test_text_time_is_the_standard_formatters_across_seconds() -> None:
    """The time to the second is formatted once per second: each record still shows its own."""
    ours, standard = logs.TextFormatter(), logging.Formatter(logs.TEXT_FORMAT)
    t0 = 1_767_225_599.25  # a second before a new year (UTC)
    times = [t0, t0 + 0.5, t0 + 0.749, t0 + 0.75, t0 + 0.999, t0 + 1.0, t0 + 3600, t0 - 86400, t0, t0 + 0.001,
             time.time(), 1_000_000_000.0, 1_000_000_000.9995]
    for created in times:
        rec = _record(job_id="job_1")
        rec.created, rec.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert ours.formatTime(rec) == standard.formatTime(rec), created
        assert ours.format(rec) == standard.format(rec) + " job_id=job_1"
    rec = _record()
    assert ours.formatTime(rec, "%H") == standard.formatTime(rec, "%H")


def test_json_is_one_object_per_line_with_the_fields() -> None:
    class Conn:  # what websockets attaches: not plain data, left out
        pass

    rec = _record(job_id="job_1", outcome="success", code=None, duration_s=1.5, websocket=Conn(), msg="a\nb", args=())
    line = logs.JsonFormatter().format(rec)
    assert "\n" not in line
    obj = orjson.loads(line)
    assert obj["level"] == "info" and obj["logger"] == "arcp.jobs" and obj["msg"] == "a\nb"
    assert obj["ts"].endswith("Z") and obj["job_id"] == "job_1" and obj["code"] is None and obj["duration_s"] == 1.5
    assert "websocket" not in obj


def test_json_fields_never_replace_the_four_keys_and_exceptions_are_kept() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("arcp", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    rec.__dict__["level"] = "forged"
    obj = orjson.loads(logs.JsonFormatter().format(rec))
    assert obj["level"] == "error" and "ValueError: boom" in obj["exc"]


@pytest.mark.parametrize("threshold,shown", [(logging.DEBUG, True), (logging.INFO, False)])
def test_websockets_info_records_count_as_debug(threshold: int, shown: bool) -> None:
    f = logs._Chatter(threshold)
    rec = _record("websockets.server", logging.INFO, "connection open", ())
    assert f.filter(rec) is shown
    assert rec.levelname == "DEBUG"
    assert f.filter(_record("websockets.server", logging.DEBUG, "< TEXT '{...token...}'", ())) is False
    assert f.filter(_record("websockets.server", logging.ERROR, "handler failed", ())) is True
    assert f.filter(_record("arcp.connection", logging.INFO, "x", ())) is (threshold <= logging.INFO)


def test_configure_replaces_the_handler_and_sets_the_level() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    saved_flags = logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing
    try:
        logs.configure("json", "warning")
        assert logs.json_enabled() and root.level == logging.WARNING
        (h,) = [h for h in root.handlers if isinstance(h.formatter, logs.JsonFormatter)]
        logs.configure("text", "debug")
        assert not logs.json_enabled() and root.level == logging.DEBUG
        assert logging.getLogger("websockets").level == logging.INFO
        # records are made without the caller's place, thread or process: no format shows them
        assert (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing) == \
            (None, False, False, False)
        (h,) = root.handlers
        out = io.StringIO()
        h.setStream(out)  # type: ignore[attr-defined]
        logging.getLogger("arcp.jobs").info("job ended: %s", "success", extra={"job_id": "job_1", "code": None})
        line = out.getvalue()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO arcp.jobs: job ended: success "
                            r"job_id=job_1 code=null\n", line), line
    finally:
        (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing) = saved_flags
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        logs._state["format"] = "text"
        sys.excepthook = sys.__excepthook__
        threading.excepthook = threading.__excepthook__


def test_a_childs_output_becomes_one_escaped_record_per_line(caplog: pytest.LogCaptureFixture) -> None:
    def relayed() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "arcp.forkserver"]

    async def until(cond: Callable[[], bool], what: str) -> None:
        """The relay is a reader callback of this loop: nothing tells of its progress."""
        deadline = time.monotonic() + 10
        while not cond():
            assert time.monotonic() < deadline, f"{what}: not within 10 s; relayed {relayed()!r}"
            await asyncio.sleep(0.01)

    async def go() -> None:
        r, w = os.pipe()
        relay = logs.OutputRelay(r, "arcp.forkserver", asyncio.get_running_loop())
        os.write(w, b"first line\nsecond \x1b[2J line\n" + b"x" * (logs.LOG_TEXT_MAX + 10) + b"\npartial")
        await until(lambda: len(relayed()) == 3, "the three whole lines relayed")  # "partial" waits for more
        os.close(w)
        await until(lambda: relay.fd < 0, "the relay closed at the end of its input")

    with caplog.at_level(logging.WARNING, logger="arcp.forkserver"):
        asyncio.run(go())
    msgs = [r.getMessage() for r in caplog.records if r.name == "arcp.forkserver"]
    assert msgs[0] == "first line" and msgs[1] == "second \\e[2J line"
    assert msgs[-1] == "partial" and all("\n" not in m for m in msgs)
    assert len(msgs) == 4 and all(len(m) < logs.LOG_TEXT_MAX + 256 for m in msgs), [len(m) for m in msgs]


# -- the settings ------------------------------------------------------------------

def test_flags_and_defaults() -> None:
    cfg = build_config({"agent": ["a=m:f"]})
    assert (cfg.log_format, cfg.log_level) == ("text", "info")
    cfg = build_config({"agent": ["a=m:f"], "log_format": "json", "log_level": "DEBUG"})
    assert (cfg.log_format, cfg.log_level) == ("json", "debug")


@pytest.mark.parametrize("key,value,flag", [("log_format", "xml", "--log-format"),
                                            ("log_level", "verbose", "--log-level")])
def test_bad_flag_values_name_the_flag(key: str, value: str, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        build_config({"agent": ["a=m:f"], key: value})
    code, out = invoke("run", "--agent", "a=m:f", flag, value)
    assert code == 2 and flag in out and value in out


@pytest.mark.parametrize("text,needle", [('log_format = "yaml"', "server.log_format"),
                                         ('log_level = "loud"', "server.log_level"),
                                         ("log_level = 3", "server.log_level")])
def test_bad_config_values_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(f"[server]\n{text}\n")
    with pytest.raises(ConfigError, match=needle):
        load_file(str(p))
    code, out = invoke("run", "--config", str(p), "--agent", "a=m:f")
    assert code == 2 and needle in out


def test_config_keys_and_flags_over_them(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('[server]\nlog_format = "json"\nlog_level = "warning"\n')
    cfg = build_config({"config": str(p), "agent": ["a=m:f"]})
    assert (cfg.log_format, cfg.log_level) == ("json", "warning")
    cfg = build_config({"config": str(p), "agent": ["a=m:f"], "log_level": "error"})
    assert (cfg.log_format, cfg.log_level) == ("json", "error")
