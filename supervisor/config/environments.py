"""Agent environments as the config file (`[[agents]] python`, `path`) and the flags
(`--agent-python NAME=PATH`, `--agent-path NAME=DIR`) give them (the value itself,
`AgentEnvironment`, is in settings.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from supervisor.config.settings import AgentEnvironment, AgentSpec, ConfigError


def interpreter(value: Any, what: str) -> str:
    """An interpreter path: absolute (a relative one is taken from the current directory),
    an existing executable file. Not resolved: a venv's python is a symlink to its base."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{what}: expected the path of a Python interpreter")
    path = os.path.abspath(os.path.expanduser(value.strip()))
    if not os.path.exists(path):
        raise ConfigError(f"{what}: {path} does not exist")
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ConfigError(f"{what}: {path} is not an executable file")
    return path


def import_dirs(value: Any, what: str) -> tuple[str, ...]:
    """Import directories: absolute, existing directories, in order, without repeats."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{what}: expected a list of directories")
    out = []
    for v in value:
        path = os.path.abspath(os.path.expanduser(v.strip()))
        if not os.path.isdir(path):
            raise ConfigError(f"{what}: {path} is not a directory")
        out.append(path)
    return tuple(dict.fromkeys(out))


def parse_environment_flags(pythons: list[str], paths: list[str]) -> dict[str, AgentEnvironment]:
    """`--agent-python NAME=PATH` and `--agent-path NAME=DIR` (repeatable) -> name -> changes.
    A name's `--agent-path` flags add up, in order."""
    py: dict[str, str] = {}
    dirs: dict[str, list[str]] = {}
    for text in pythons:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"--agent-python {text!r}: expected NAME=PATH")
        py[name.strip()] = interpreter(value, f"--agent-python {text!r}")
    for text in paths:
        name, sep, value = text.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"--agent-path {text!r}: expected NAME=DIR")
        dirs.setdefault(name.strip(), []).extend(import_dirs(value, f"--agent-path {text!r}"))
    return {name: AgentEnvironment(py.get(name), tuple(dict.fromkeys(dirs.get(name, []))))
            for name in {*py, *dirs}}


def with_environment_flags(agents: Sequence[AgentSpec], pythons: list[str], paths: list[str]) -> list[AgentSpec]:
    """The agents with the flags' environments: a flag overrides the config file's `python`
    (or `path`) for every version of its agent; a flag naming no agent is an error."""
    changes = parse_environment_flags(pythons, paths)
    names = {a.name for a in agents}
    for name in changes:
        if name not in names:
            flag = "--agent-python" if name in {p.partition("=")[0].strip() for p in pythons} else "--agent-path"
            raise ConfigError(f"{flag} {name}=...: no agent named {name!r} is registered")
    out = []
    for a in agents:
        c = changes.get(a.name)
        if c is not None:
            env = AgentEnvironment(c.python or a.environment.python, c.path or a.environment.path)
            a = replace(a, environment=env)
        out.append(a)
    return out
