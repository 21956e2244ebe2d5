"""Agents for the agent-environment tests: what a job can import and read, and a package
that only its own venv has."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from worker import JobContext


def probe(input: Any, job: JobContext) -> Any:
    """Try each module of `modules` and each path of `read`; say where this job runs."""
    imported: dict[str, str] = {}
    for name in input.get("modules", []):
        try:
            mod = importlib.import_module(name)
            imported[name] = "ok " + str(getattr(mod, "__file__", ""))
        except BaseException as e:
            imported[name] = f"{type(e).__name__}: {e}"
    read: dict[str, str] = {}
    for path in input.get("read", []):
        try:
            if os.path.isdir(path):
                read[path] = "entries: " + ",".join(sorted(os.listdir(path))[:400])
            else:
                with open(path, "rb") as f:
                    read[path] = f"read {len(f.read())} bytes"
        except OSError as e:
            read[path] = f"{type(e).__name__}: {e}"
    return {"imported": imported, "read": read, "executable": sys.executable, "prefix": sys.prefix,
            "version": list(sys.version_info[:2]), "path": sys.path}


def extra(input: Any, job: JobContext) -> Any:
    """A package only the agent's own venv has."""
    import arcp_extra_pkg  # type: ignore[import-not-found]

    return {"value": arcp_extra_pkg.VALUE, "prefix": sys.prefix, "version": list(sys.version_info[:2])}
