"""Settings: the TOML config file and command-line flags, merged into a frozen Config.

Every problem raises ConfigError with a message naming the flag or key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.messages import AGENT_NAME_RE, AGENT_VERSION_RE

KiB, MiB, GiB = 1024, 1024 * 1024, 1024 * 1024 * 1024
LOG_CHOICES = {"log_format": ("text", "json"), "log_level": ("debug", "info", "warning", "error")}
SIZE_RE = re.compile(r"\s*(\d+)\s*(?:([KMG])(?:i?B)?|B?)\s*", re.IGNORECASE)
ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")


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
class AgentSpec:
    name: str
    version: str
    entry: str
    limits: Limits
    default: bool = False

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


def memory_available(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """The memory the supervisor may use: its cgroup's memory limit (the tightest of its
    group and the groups above it, v1 `memory.limit_in_bytes` or v2 `memory.max`) if one is
    set and below the host's, else the host's MemTotal."""
    total = _mem_total(f"{proc}/meminfo")
    limit = _cgroup_memory_limit(f"{proc}/self/cgroup", cgroup_root)
    return min(total, limit) if limit is not None else total


def default_memory_budget(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int:
    """`--memory-budget`'s default: 80% of `memory_available()`."""
    return memory_available(proc, cgroup_root) * 4 // 5


def _mem_total(path: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_memory_limit(self_cgroup: str, root: str) -> int | None:
    try:
        with open(self_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    if v1 is not None:
        return _tightest(f"{root}/memory", v1, "memory.limit_in_bytes")
    if v2 is not None and Path(root, "cgroup.controllers").exists():
        return _tightest(root, v2, "memory.max")
    return None


def _tightest(mount: str, group: str, name: str) -> int | None:
    """The lowest limit set on `group` or any group above it (a limit applies to the subtree);
    None if none is. A group outside this mount's view (another cgroup namespace) counts
    from the mount's root."""
    best: int | None = None
    rel = Path(group.strip("/"))
    if ".." in rel.parts:  # not below this mount's root
        rel = Path()
    while True:
        try:
            text = Path(mount, rel, name).read_text().strip()
        except OSError:
            text = ""
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "unlimited" with a huge number, v2 with "max"
            best = int(text) if best is None else min(best, int(text))
        if rel == Path():
            return best
        rel = rel.parent


def log_setting(key: str, value: Any, what: str) -> str:
    """`--log-format` / `--log-level` (`key` log_format / log_level): one of its choices."""
    choices = LOG_CHOICES[key]
    v = value.lower() if isinstance(value, str) else value
    if v not in choices:
        raise ConfigError(f"{what}: {value!r} is not one of {', '.join(choices)}")
    return str(v)


def parse_agent_flag(text: str, limits: Limits) -> AgentSpec:
    """`NAME[@VERSION]=MODULE:FUNCTION`."""
    ref, sep, entry = text.partition("=")
    if not sep:
        raise ConfigError(f"--agent {text!r}: expected NAME[@VERSION]=MODULE:FUNCTION")
    return _agent(ref.strip(), entry.strip(), limits, False, f"--agent {text!r}")


def _agent(ref: str, entry: str, limits: Limits, default: bool, what: str) -> AgentSpec:
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


# Jobs' uids (and gids) when the supervisor is root and the config names none: far above
# the ranges distributions give users (1000-60000) and user namespaces (/etc/subuid,
# usually 100000 + 65536 per user), below 2^31 for tools that keep a uid in a signed int.
DEFAULT_JOB_UIDS = (1_900_000_000, 1_900_065_535)


def parse_uid_range(text: Any, what: str) -> tuple[int, int]:
    if not isinstance(text, str) or not re.match(r"^\d+-\d+$", text):
        raise ConfigError(f"{what}: expected FIRST-LAST, got {text!r}")
    a, b = (int(x) for x in text.split("-"))
    if not 0 < a <= b or b >= 2 ** 31:
        raise ConfigError(f"{what}: range {text!r} must be ascending, above 0 and below 2^31")
    check_uid_range((a, b), what)
    return a, b


def check_uid_range(r: tuple[int, int], what: str) -> None:
    """A job must never share a uid or gid with anyone else: no user, group, or subordinate
    id range of /etc/passwd, /etc/group, /etc/subuid or /etc/subgid may fall in `r`."""
    import grp
    import pwd

    a, b = r
    text = f"{a}-{b}"
    for user in pwd.getpwall():
        if a <= user.pw_uid <= b:
            raise ConfigError(f"{what}: uid {user.pw_uid} of range {text!r} belongs to user {user.pw_name!r}")
    for group in grp.getgrall():
        if a <= group.gr_gid <= b:
            raise ConfigError(f"{what}: gid {group.gr_gid} of range {text!r} belongs to group {group.gr_name!r}")
    for path in ("/etc/subuid", "/etc/subgid"):
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                lo, n = int(parts[1]), int(parts[2])
                if lo <= b and a < lo + n:
                    raise ConfigError(f"{what}: range {text!r} overlaps {parts[0]!r}'s subordinate ids "
                                      f"{lo}-{lo + n - 1} in {path}")


_SERVER_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str, "port": int, "path": str, "stdio": bool, "state_dir": str, "grace": (int, float),
    "drain_timeout": (int, float),
    "reuse_workers": int, "heartbeat_interval": int, "resume_window": int, "retention_jobs": int,
    "retention_seconds": int, "max_result_bytes": (int, str), "chunk_size": (int, str),
    "ws_compression": bool, "back_pressure_threshold": int, "egress_header_timeout": (int, float),
    "tmp_size": (int, str), "session_log_bytes": (int, str),
    "max_jobs": int, "max_queued": int, "memory_budget": (int, str),
    "log_format": str, "log_level": str,
}
_LIMIT_KEYS = ("memory", "cpu_time", "max_procs", "max_open_files", "max_file_size", "max_runtime")


def _limits_from(table: Any, base: Limits, where: str) -> Limits:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    values: dict[str, int] = {}
    for key, v in table.items():
        what = f"{where}.{key}"
        if key not in _LIMIT_KEYS:
            raise ConfigError(f"{what}: unknown key (known: {', '.join(_LIMIT_KEYS)})")
        if key in ("memory", "max_file_size"):
            values[key] = parse_size(v, what)
        else:
            values[key] = _positive_int(v, what)
    return replace(base, **values)


def _positive_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{what}: must be a positive integer, got {v!r}")
    return v


def load_file(path: str) -> dict[str, Any]:
    """Read and check a TOML config into keyword arguments for `Config`."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path}: not UTF-8 text: {e}") from e
    out: dict[str, Any] = {}
    known = {"server", "auth", "limits", "agents", "sandbox", "credentials", "quotas"}
    for key in doc:
        if key not in known:
            raise ConfigError(f"config key [{key}]: unknown section (known: {', '.join(sorted(known))})")
    server = doc.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError("config key [server]: must be a table")
    for key, v in server.items():
        t = _SERVER_KEYS.get(key)
        if t is None:
            raise ConfigError(f"config key server.{key}: unknown key")
        if isinstance(v, bool) and t is not bool:
            raise ConfigError(f"config key server.{key}: wrong type {type(v).__name__}")
        if not isinstance(v, t):
            raise ConfigError(f"config key server.{key}: wrong type {type(v).__name__}")
        if key in ("max_result_bytes", "chunk_size", "tmp_size", "session_log_bytes", "memory_budget"):
            v = parse_size(v, f"config key server.{key}")
        elif key == "max_jobs":
            v = _positive_int(v, f"config key server.{key}")
        elif key == "max_queued" and isinstance(v, int) and v < 0:
            raise ConfigError(f"config key server.{key}: must be an integer >= 0, got {v!r}")
        elif key in LOG_CHOICES:
            v = log_setting(key, v, f"config key server.{key}")
        out[key] = v
    auth = doc.get("auth", {})
    if not isinstance(auth, dict):
        raise ConfigError("config key [auth]: must be a table")
    tokens = auth.get("tokens", {})
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and isinstance(v, str) and k and v
                                               for k, v in tokens.items()):
        raise ConfigError("config key auth.tokens: must map token strings to principal strings")
    if tokens:
        out["tokens"] = dict(tokens)
    for key in auth:
        if key not in ("tokens", "admins"):
            raise ConfigError(f"config key auth.{key}: unknown key (known: tokens, admins)")
    if "admins" in auth:
        admins = auth["admins"]
        if not isinstance(admins, list) or not all(isinstance(a, str) and a for a in admins):
            raise ConfigError("config key auth.admins: must be a list of principal strings")
        out["admins"] = tuple(dict.fromkeys(admins))
    out.update(_quotas_from(doc.get("quotas", {})))
    limits = _limits_from(doc.get("limits", {}), Limits(), "config key limits")
    out["limits"] = limits
    agents = doc.get("agents", [])
    if not isinstance(agents, list):
        raise ConfigError("config key [[agents]]: must be an array of tables")
    specs = []
    for i, a in enumerate(agents):
        where = f"config key agents[{i}]"
        if not isinstance(a, dict):
            raise ConfigError(f"{where}: must be a table")
        extra = set(a) - {"name", "version", "entry", "default", "limits"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}: unknown key")
        name, version, entry = a.get("name"), a.get("version", "0.0.0"), a.get("entry")
        if not isinstance(name, str) or not isinstance(version, str) or not isinstance(entry, str):
            raise ConfigError(f"{where}: name, version and entry must be strings")
        default = a.get("default", False)
        if not isinstance(default, bool):
            raise ConfigError(f"{where}.default: must be true or false")
        alimits = _limits_from(a.get("limits", {}), limits, f"{where}.limits")
        specs.append(_agent(f"{name}@{version}", entry, alimits, default, where))
    out["agents"] = tuple(specs)
    creds = doc.get("credentials", {})
    if not isinstance(creds, dict):
        raise ConfigError("config key [credentials]: must be a table")
    for key in creds:
        if key not in ("provisioner", "options"):
            raise ConfigError(f"config key credentials.{key}: unknown key (known: provisioner, options)")
    if creds:
        prov = creds.get("provisioner")
        if not isinstance(prov, str) or not (prov == "static" or ENTRY_RE.fullmatch(prov)):
            raise ConfigError("config key credentials.provisioner: must be \"static\" or MODULE:FACTORY")
        options = creds.get("options", {})
        if not isinstance(options, dict):
            raise ConfigError("config key credentials.options: must be a table")
        out["credentials_provisioner"] = prov
        out["credentials_options"] = dict(options)
    sandbox = doc.get("sandbox", {})
    if not isinstance(sandbox, dict):
        raise ConfigError("config key [sandbox]: must be a table")
    for key, v in sandbox.items():
        if key == "job_uids":
            out["job_uids"] = parse_uid_range(v, "config key sandbox.job_uids")
        elif key == "allow_shared_uid":
            if not isinstance(v, bool):
                raise ConfigError("config key sandbox.allow_shared_uid: must be true or false")
            out["allow_shared_uid"] = v
        else:
            raise ConfigError(f"config key sandbox.{key}: unknown key")
    return out


def _quotas_from(table: Any) -> dict[str, Any]:
    """`[quotas] max_jobs = N` and `[quotas.principals] NAME = N`."""
    if not isinstance(table, dict):
        raise ConfigError("config key [quotas]: must be a table")
    out: dict[str, Any] = {}
    for key, v in table.items():
        if key == "max_jobs":
            out["quota_max_jobs"] = _positive_int(v, "config key quotas.max_jobs")
        elif key == "principals":
            if not isinstance(v, dict):
                raise ConfigError("config key quotas.principals: must be a table of NAME = N")
            out["quota_principals"] = {name: _positive_int(n, f"config key quotas.principals.{name}")
                                       for name, n in v.items()}
        else:
            raise ConfigError(f"config key quotas.{key}: unknown key (known: max_jobs, principals)")
    return out


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
