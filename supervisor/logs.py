"""The supervisor's log: stderr, as text or as one JSON object per line.

`--log-format text` (the default) writes `TIME LEVEL LOGGER: MESSAGE key=value ...`;
`--log-format json` writes `{"ts", "level", "logger", "msg", ...fields}` per line. The
fields are a record's `extra` (job_id, session_id, principal, agent, outcome, ...): plain
values only (strings, numbers, booleans, null, lists and objects of them), so an object a
library attaches to its records (websockets' connection) is left out.

`--log-level` sets the threshold. The websockets library's own info records (a connection
opened, closed or refused) are per-connection chatter: they count as `debug`, like the
supervisor's records of a connection's open and close, and so print only at debug. Its
debug records (a trace of every frame and header, a hello's token included) are never made.

Whatever the fork server and the workers it forks write on their stdout or stderr before a
job's output is captured (set-up failures, tracebacks) reaches the log through
`OutputRelay`: one record per line, in the same format, escaped like any untrusted text
(`log_text.one_line`), so that nothing but records of this format is ever written to stderr.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from collections import deque
from types import TracebackType
from typing import Any

import orjson

from supervisor.log_text import LOG_TEXT_MAX, one_line

FORMATS = ("text", "json")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CHATTY = ("websockets",)  # libraries whose info records are per-connection chatter
RESERVED = ("ts", "level", "logger", "msg")
# What every LogRecord has: anything else in its __dict__ came from `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_FIRST_EXTRA = len(logging.LogRecord("", 0, "", 0, "", (), None).__dict__)  # where `extra` begins
_PLAIN = (str, int, float, bool, type(None), list, dict)
_QUOTED = re.compile(r'[\s"=\\]')  # a text value with any of these (or unprintable) is JSON-quoted
_state = {"format": "text"}


def check_format(value: Any, what: str) -> str:
    """`value` as a log format; ValueError naming `what` (the flag or key) otherwise."""
    if value not in FORMATS:
        raise ValueError(f"{what}: {value!r} is not a log format (text or json)")
    return str(value)


def check_level(value: Any, what: str) -> str:
    if value not in LEVELS:
        raise ValueError(f"{what}: {value!r} is not a log level (debug, info, warning or error)")
    return str(value)


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record (its `extra`), plain values only, in their order.

    A record's own attributes come first in its __dict__ (its __init__ sets them), `extra`'s
    after them (makeRecord adds them), so only the keys past those are looked at."""
    d = record.__dict__
    keys = list(d)
    return {k: d[k] for k in keys[_FIRST_EXTRA:] if k not in _STANDARD and not k.startswith("_")
            and isinstance(d[k], _PLAIN)}


def _text_value(v: Any) -> str:
    if isinstance(v, str):
        if v and v.isprintable() and _QUOTED.search(v) is None:
            return v
        return orjson.dumps(v).decode()
    return orjson.dumps(v, default=str).decode()  # numbers, booleans, null, lists and objects as JSON


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE key=value ...` (values with spaces or quotes JSON-quoted)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """As logging.Formatter's (local time, `YYYY-MM-DD HH:MM:SS,mmm`), the part to the
        second formatted once per second."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        sec = int(record.created)
        cached = self._second  # one read: the pair is replaced whole
        if cached[0] != sec:
            cached = self._second = (sec, time.strftime(self.default_time_format, self.converter(sec)))
        return f"{cached[1]},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        """What logging.Formatter(TEXT_FORMAT) makes of the record (its traceback and stack on
        the lines after), with the fields on the first line; built directly, without the
        format string's generic machinery (two records per job)."""
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        text = f"{record.asctime} {record.levelname} {record.name}: {record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}" if text[-1:] != "\n" else text + record.exc_text
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}" if text[-1:] != "\n" \
                else text + self.formatStack(record.stack_info)
        extra = fields(record)
        if not extra:
            return text
        line, nl, rest = text.partition("\n")  # fields stay on the record's first line
        kv = " ".join([f"{k}={_text_value(v)}" for k, v in extra.items()])
        return f"{line} {kv}{nl}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (RFC 3339, UTC), level, logger, msg, then the fields;
    `exc` holds a traceback, `stack` a stack. Never more than one line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        for k, v in fields(record).items():
            if k not in RESERVED:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class _Chatter(logging.Filter):
    """Libraries' info records (per-connection chatter) count as debug, and their own debug
    records (a trace of every frame and header, tokens included) are dropped; then the
    threshold."""

    def __init__(self, threshold: int) -> None:
        super().__init__()
        self.threshold = threshold

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in CHATTY:
            if record.levelno < logging.INFO:
                return False
            if record.levelno == logging.INFO:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.threshold


def configure(fmt: str = "text", level: str = "info") -> None:
    """The root logger writes to stderr in `fmt` from `level` on (replacing any handler).

    Records are made without what neither format shows: the caller's file, line and function
    (a walk up the stack per record; `stack_info` is then not gathered either), and the
    thread's and process's ids and names."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    threshold = LEVELS[level]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_Chatter(threshold))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in CHATTY:  # info records reach the filter (to be demoted); debug ones are never made
        logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn as records too, not bare lines
    _state["format"] = fmt
    if fmt == "json":  # what Python would print as bare tracebacks
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def json_enabled() -> bool:
    return _state["format"] == "json"


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("arcp").critical("uncaught exception", exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("arcp").critical("uncaught exception in thread %s", name,
                                       exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


LAST_LINES, LAST_LINE_MAX = 4, 500


class OutputRelay:
    """Lines a child process writes to the pipe `fd` become records of `logger` (at warning),
    each escaped onto one line and capped; a longer line is cut into several records."""

    def __init__(self, fd: int, logger: str, loop: Any) -> None:
        self.fd = fd
        self.log = logging.getLogger(logger)
        self._loop = loop
        self._partial = b""
        self.last_lines: deque[str] = deque(maxlen=LAST_LINES)  # for a message about a child that failed
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        while len(self._partial) > LOG_TEXT_MAX:
            lines.append(self._partial[:LOG_TEXT_MAX])
            self._partial = self._partial[LOG_TEXT_MAX:]
        for line in lines:
            text = line.decode(errors="replace").rstrip("\r")
            if text.strip():
                self.last_lines.append(one_line(text)[:LAST_LINE_MAX])
                self.log.warning("%s", one_line(text))

    def flush(self) -> None:
        """Read what the child wrote so far (it has exited: nothing more is coming soon)."""
        for _ in range(16):
            if self.fd < 0:
                return
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            self._feed(data)

    def close(self) -> None:
        """Stop reading (at EOF, or once the child is stopped): what it wrote last is logged."""
        if self.fd < 0:
            return
        self._loop.remove_reader(self.fd)
        for _ in range(16):  # bounded: a worker may still hold the pipe
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # BlockingIOError: nothing more for now
                break
            if not data:
                break
            self._feed(data)
        self._feed(b"\n")
        os.close(self.fd)
        self.fd = -1


__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "OutputRelay", "TextFormatter", "check_format", "check_level",
           "configure", "fields", "json_enabled"]
