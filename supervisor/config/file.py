"""The TOML config file (`--config`): each section and key checked, read into keyword
arguments for Config; every problem names its key."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from supervisor.config.environments import import_dirs, interpreter
from supervisor.config.settings import (
    ENTRY_RE, LOG_CHOICES, AgentEnvironment, ConfigError, Limits, agent_spec, check_node_id, check_state_url,
    log_setting, parse_size, positive_seconds,
)
from supervisor.config.uids import parse_uid_range

_SERVER_KEYS: dict[str, type | tuple[type, ...]] = {
    "host": str, "port": int, "path": str, "stdio": bool, "state_dir": str, "grace": (int, float),
    "state_url": str, "node_id": str, "node_heartbeat": (int, float), "node_timeout": (int, float),
    "drain_timeout": (int, float),
    "reuse_workers": int, "heartbeat_interval": int, "resume_window": int, "retention_jobs": int,
    "retention_seconds": int, "max_result_bytes": (int, str), "chunk_size": (int, str),
    "ws_compression": bool, "metrics": bool, "usage": bool, "back_pressure_threshold": int, "egress_header_timeout": (int, float),
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


def _beside(config: Path, value: Any) -> Any:
    """A path (or list of paths) of the config file, relative ones made absolute from its
    directory; anything else as it is (the check that follows names it)."""
    base = config.resolve().parent
    if isinstance(value, str) and value.strip():
        return str(base / Path(value.strip()).expanduser())
    if isinstance(value, list):
        return [_beside(config, v) for v in value]
    return value


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
        elif key == "state_url":
            v = check_state_url(v, f"config key server.{key}")
        elif key == "node_id":
            v = check_node_id(v, f"config key server.{key}")
        elif key in ("node_heartbeat", "node_timeout"):
            v = positive_seconds(v, f"config key server.{key}")
        out[key] = v
    if "state_url" in out and "state_dir" in out:
        raise ConfigError("config key server.state_url: give it or server.state_dir, not both: state_url keeps "
                          "the state in PostgreSQL, state_dir in SQLite")
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
        extra = set(a) - {"name", "version", "entry", "default", "limits", "python", "path"}
        if extra:
            raise ConfigError(f"{where}.{sorted(extra)[0]}: unknown key")
        name, version, entry = a.get("name"), a.get("version", "0.0.0"), a.get("entry")
        if not isinstance(name, str) or not isinstance(version, str) or not isinstance(entry, str):
            raise ConfigError(f"{where}: name, version and entry must be strings")
        default = a.get("default", False)
        if not isinstance(default, bool):
            raise ConfigError(f"{where}.default: must be true or false")
        alimits = _limits_from(a.get("limits", {}), limits, f"{where}.limits")
        env = AgentEnvironment(  # relative paths are taken from the config file's directory
            interpreter(_beside(p, a["python"]), f"{where}.python") if "python" in a else None,
            import_dirs(_beside(p, a["path"]), f"{where}.path") if "path" in a else ())
        specs.append(replace(agent_spec(f"{name}@{version}", entry, alimits, default, where), environment=env))
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
