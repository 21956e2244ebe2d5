"""Settings: the frozen Config the server runs with, its per-job Limits and AgentSpecs, the
values a flag or key holds (sizes, log settings, agents), and the cross-field checks.

Every problem raises ConfigError with a message naming the flag or key.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field
from typing import Any

from shared.messages import AGENT_NAME_RE, AGENT_VERSION_RE

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
LOG_CHOICES = {"log_format": ("text", "json"), "log_level": ("debug", "info", "warning", "error")}
SIZE_RE = re.compile(r"\s*(\d+)\s*(?:([KMG])(?:i?B)?|B?)\s*", re.IGNORECASE)
ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
NODE_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
STATE_URL_SCHEMES = ("postgresql://", "postgres://")
_PASSWORD_PARAM_RE = re.compile(r"(password\s*=\s*)[^&\s]*", re.IGNORECASE)


class ConfigError(ValueError):
    """A bad flag or config key; the message names it."""


def parse_size(text: Any, what: str) -> int:
    """`512`, `64K`, `256M`, `2G` (binary) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{what}: size must be positive")
        return text
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected a size like 256M, got {text!r}")
    m = SIZE_RE.fullmatch(text)
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size (a number with an optional K, M or G suffix)")
    n = int(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[(m.group(2) or "").upper()]
    if n <= 0:
        raise ConfigError(f"{what}: size must be positive")
    return n


@dataclass(frozen=True)
class Limits:
    """Per-job resource limits (operator defaults and ceilings)."""

    memory: int = 1 * GiB
    cpu_time: int = 300
    max_procs: int = 64
    max_open_files: int = 1024
    max_file_size: int = 1 * GiB
    max_runtime: int = 3600  # wall-clock seconds from the job's start

    def as_wire(self) -> dict[str, int]:
        return {
            "memory_mb": self.memory // MiB,
            "cpu_sec": self.cpu_time,
            "max_procs": self.max_procs,
            "max_open_files": self.max_open_files,
            "max_file_size_mb": self.max_file_size // MiB,
            "runtime_sec": self.max_runtime,
        }


@dataclass(frozen=True)
class AgentEnvironment:
    """The interpreter an agent's jobs run on and the directories they import from
    (config/environments.py reads them). `python`: an interpreter, typically a venv's
    `bin/python`, kept as given (resolving its symlink would lose the venv), or None for the
    supervisor's own, without its site-packages; `path`: import directories put first on
    the job's import path. Agents with equal environments share a fork server; agents of
    different ones never share a fork server or a worker."""

    python: str | None = None
    path: tuple[str, ...] = ()

    @property
    def is_default(self) -> bool:
        return self.python is None and not self.path

    def describe(self) -> str:
        """For messages: the interpreter and the import directories."""
        py = self.python or "the supervisor's interpreter"
        return py + (f" with {', '.join(self.path)} on the import path" if self.path else "")


DEFAULT_ENVIRONMENT = AgentEnvironment()


@dataclass(frozen=True)
class AgentSpec:
    name: str
    version: str
    entry: str
    limits: Limits
    default: bool = False
    environment: AgentEnvironment = DEFAULT_ENVIRONMENT

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 7777
    path: str = "/arcp"
    stdio: bool = False
    state_dir: str | None = None
    state_url: str | None = None  # postgresql://...: the state in PostgreSQL, shared by several supervisors
    node_id: str | None = None  # this process's id among those sharing state_url; None: HOSTNAME-PID
    node_heartbeat: float = 2.0  # seconds between renewals of this process's liveness row
    node_timeout: float = 10.0  # seconds of silence after which the others declare a process lost
    grace: float = 1.0
    drain_timeout: float = 30.0  # seconds running jobs may go on after SIGTERM/SIGINT before they are cancelled
    reuse_workers: int = 1
    heartbeat_interval: int = 30
    resume_window: int = 600
    retention_jobs: int = 10000
    retention_seconds: int = 86400
    max_result_bytes: int = 32 * MiB
    chunk_size: int = 256 * KiB
    ws_compression: bool = False
    metrics: bool = True  # /metrics and the Prometheus counters (off: /metrics is 404)
    usage: bool = True  # each job's usage measured by the kernel (off: wall time only)
    back_pressure_threshold: int = 0  # 0: no back_pressure status events
    tmp_size: int = 256 * MiB  # each job's private temp dir (a tmpfs of its own), at most its memory limit
    egress_header_timeout: float = 10.0  # seconds a job's proxy request may take to send its head
    session_log_bytes: int = 64 * MiB  # each session's frame log (resume, subscribe history), in bytes
    tokens: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    agents: tuple[AgentSpec, ...] = ()
    defaults: tuple[str, ...] = ()
    job_uids: tuple[int, int] | None = None  # None: DEFAULT_JOB_UIDS (when the supervisor is root)
    allow_shared_uid: bool = False  # a supervisor that is not root may run jobs under its own uid
    warm_workers: int = 4
    credentials_provisioner: str | None = None  # [credentials] provisioner: "static" or MODULE:FACTORY
    credentials_options: dict[str, Any] = field(default_factory=dict)
    # Admission (contract.md "Operating"): capacity, queue and quotas
    max_jobs: int = 256  # jobs running at once, all principals
    max_queued: int = 10000  # jobs waiting to start; beyond it submits are refused as overloaded
    memory_budget: int | None = None  # the sum of running jobs' memory limits; None: default_memory_budget()
    quota_max_jobs: int | None = None  # [quotas] max_jobs: running jobs of each principal
    quota_principals: dict[str, int] = field(default_factory=dict)  # [quotas.principals] NAME = N
    admins: tuple[str, ...] = ()  # [auth] admins: principals that see and may cancel every job
    log_format: str = "text"  # text or json (one object per line): supervisor/logs.py
    log_level: str = "info"  # debug, info, warning or error


def log_setting(key: str, value: Any, what: str) -> str:
    """`--log-format` / `--log-level` (`key` log_format / log_level): one of its choices."""
    choices = LOG_CHOICES[key]
    v = value.lower() if isinstance(value, str) else value
    if v not in choices:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return str(v)


def redact_url(url: str) -> str:
    """A state URL as shown in messages and logs: a password in its user part or in a
    `password` parameter replaced by ***."""
    from supervisor.state.postgres import _redacted

    shown = _redacted(url) if "://" in url else _redacted("x://" + url)[len("x://"):]
    return _PASSWORD_PARAM_RE.sub(r"\1***", shown)


def check_state_url(url: Any, what: str) -> str:
    """`--state-url` / `[server] state_url`: a postgresql:// or postgres:// URL that libpq can parse."""
    expected = "expected a PostgreSQL URL, postgresql://USER@HOST:PORT/DB (or postgres://...)"
    if not isinstance(url, str):
        raise ConfigError(f"{what}: {expected}, got {url!r}")
    shown = redact_url(url)
    if not url.startswith(STATE_URL_SCHEMES):
        raise ConfigError(f"{what}: {expected}, got {shown!r}")
    from psycopg import Error as PgError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except PgError as e:
        why = str(e).strip().replace(url, shown)  # libpq's message may quote a password's text
        userinfo = url.partition("://")[2].rpartition("@")[0]
        secrets = [userinfo.split(":", 1)[1]] if ":" in userinfo else []
        secrets += [m.group(0)[len(m.group(1)):] for m in _PASSWORD_PARAM_RE.finditer(url)]
        for secret in sorted(filter(None, secrets), key=len, reverse=True):
            why = why.replace(secret, "***")
        raise ConfigError(f"{what}: {shown!r} is not a valid PostgreSQL URL: {why}") from None
    return url


def check_node_id(node_id: Any, what: str) -> str:
    """`--node-id` / `[server] node_id`: 1 to 128 of A-Z a-z 0-9 . _ : -"""
    if not isinstance(node_id, str) or not NODE_ID_RE.fullmatch(node_id):
        raise ConfigError(f"{what}: {node_id!r} is not a node id (1 to 128 characters of A-Z, a-z, 0-9, "
                          "'.', '_', ':' and '-')")
    return node_id


def positive_seconds(value: Any, what: str) -> float:
    """A number of seconds > 0 (a fraction allowed), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what}: must be a number of seconds > 0, got {value!r}")
    return float(value)


def parse_agent_flag(text: str, limits: Limits) -> AgentSpec:
    """`NAME[@VERSION]=MODULE:FUNCTION`."""
    ref, sep, entry = text.partition("=")
    if not sep:
        raise ConfigError(f"--agent {text!r}: expected NAME[@VERSION]=MODULE:FUNCTION")
    return agent_spec(ref.strip(), entry.strip(), limits, False, f"--agent {text!r}")


def agent_spec(ref: str, entry: str, limits: Limits, default: bool, what: str) -> AgentSpec:
    name, at, version = ref.partition("@")
    if not at:
        version = "0.0.0"
    if not AGENT_NAME_RE.fullmatch(name):
        raise ConfigError(f"{what}: agent name {name!r} is not valid ([a-z0-9][a-z0-9._-]*)")
    if not AGENT_VERSION_RE.fullmatch(version):
        raise ConfigError(f"{what}: agent version {version!r} is not valid")
    if not ENTRY_RE.fullmatch(entry):
        raise ConfigError(f"{what}: entry {entry!r} is not MODULE:FUNCTION")
    return AgentSpec(name=name, version=version, entry=entry, limits=limits, default=default)


def check(cfg: Config) -> Config:
    """Cross-field checks; ConfigError naming the flag."""
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"--port: {cfg.port} is not a TCP port")
    if not cfg.path.startswith("/"):
        raise ConfigError(f"--path: {cfg.path!r} must start with '/'")
    if cfg.grace < 0:
        raise ConfigError("--grace: must be >= 0")
    if not 0 <= cfg.drain_timeout <= 86400:
        raise ConfigError("--drain-timeout: must be >= 0 and at most 86400 seconds")
    if cfg.state_url is not None:
        check_state_url(cfg.state_url, "--state-url")
        if cfg.state_dir is not None:
            raise ConfigError("--state-url and --state-dir: give one of them, not both (flags, or config keys "
                              "server.state_url and server.state_dir): --state-url keeps the state in "
                              "PostgreSQL, --state-dir in SQLite")
    if cfg.node_id is not None:
        check_node_id(cfg.node_id, "--node-id")
    positive_seconds(cfg.node_heartbeat, "--node-heartbeat")
    positive_seconds(cfg.node_timeout, "--node-timeout")
    if cfg.node_timeout < 2 * cfg.node_heartbeat:
        raise ConfigError(f"--node-timeout: {cfg.node_timeout:g} is less than twice --node-heartbeat "
                          f"({cfg.node_heartbeat:g}); it must be at least 2 x --node-heartbeat (config keys "
                          "server.node_timeout and server.node_heartbeat)")
    if cfg.reuse_workers < 1:
        raise ConfigError("--reuse-workers: must be >= 1")
    if cfg.heartbeat_interval < 1:
        raise ConfigError("--heartbeat-interval: must be >= 1")
    if cfg.back_pressure_threshold < 0:
        raise ConfigError("--back-pressure-threshold: must be >= 0 (0 turns it off)")
    if not 0 < cfg.egress_header_timeout <= 3600:
        raise ConfigError("--egress-header-timeout: must be > 0 and at most 3600 seconds")
    if cfg.tmp_size < MiB:
        raise ConfigError("--tmp-size: must be at least 1M")
    if cfg.chunk_size < 1024:
        raise ConfigError("--chunk-size: must be at least 1K")
    if cfg.session_log_bytes < MiB:
        raise ConfigError("--session-log-bytes: must be at least 1M (a frame of the log fits in it)")
    if cfg.max_jobs < 1:
        raise ConfigError("--max-jobs: must be a positive integer")
    if cfg.max_queued < 0:
        raise ConfigError("--max-queued: must be an integer >= 0 (0: no job waits; a full server refuses)")
    if cfg.memory_budget is not None and cfg.memory_budget < MiB:
        raise ConfigError("--memory-budget: must be at least 1M")
    if not cfg.stdio and not cfg.tokens and not _is_loopback(cfg.host):
        raise ConfigError(
            f"--host: {cfg.host} is not a loopback address; without --token the server runs "
            "unauthenticated and binds loopback only"
        )
    if not cfg.agents:
        raise ConfigError("--agent: no agent registered (give --agent or [[agents]] in --config)")
    seen: set[str] = set()
    for a in cfg.agents:
        if a.ref in seen:
            raise ConfigError(f"--agent: {a.ref} registered twice")
        seen.add(a.ref)
    for d in cfg.defaults:
        if d not in seen:
            raise ConfigError(f"--default {d}: no such agent version registered")
    return cfg


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
