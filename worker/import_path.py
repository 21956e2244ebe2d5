"""The job's import path: built once in the fork server, taken by each worker only once
its job's sandbox is applied.

The fork server runs as root and unsandboxed, so it imports nothing from where an agent's
code lives: its own path is the worker runtime and the interpreter's standard library
(`python -I -S`: no PYTHON* variables, no current directory, no site-packages, and so
no `.pth` file and no `sitecustomize` of an agent's venv runs in it). The job's path is
the agent environment's import directories, the directory the supervisor was started
in, the worker runtime, the standard library and, for an agent's own interpreter (a
venv), its site-packages with the directories its `.pth` files name. A `.pth` line that
is code (`import ...`) is not run: that would be the agent's code running outside its
sandbox; the packages that need one import as usual from the site-packages directory.
"""

from __future__ import annotations

import os
import site
import sys
from collections.abc import Iterable

JOB_PATH: list[str] = []  # built by build() in the fork server, inherited by every worker
SKIPPED_PTH: list[str] = []  # `.pth` lines not run (code), for the fork server's log


def build(import_dirs: Iterable[str], start_dir: str | None, runtime: str | None, own_prefix: bool) -> list[str]:
    """The job's import path (see the module docstring); also kept in JOB_PATH."""
    head = [*import_dirs, *([start_dir] if start_dir else []), *([runtime] if runtime else [])]
    own = [p for p in sys.path if p and p not in head]  # the interpreter's standard library
    path = list(dict.fromkeys(head + own + (site_dirs() if own_prefix else [])))
    JOB_PATH[:] = path
    return path


def site_dirs() -> list[str]:
    """This interpreter's site-packages, as `site` would add them (its venv's, and its base
    installation's when the venv includes the system's), with the directories their
    `.pth` files name; code lines of `.pth` files are skipped (SKIPPED_PTH)."""
    system_site = enter_venv()
    prefixes = [sys.prefix]
    if sys.prefix != sys.base_prefix and system_site:
        prefixes.append(sys.base_prefix)
    out: list[str] = []
    for d in site.getsitepackages(prefixes):
        if os.path.isdir(d):
            out.append(d)
            out += _pth_dirs(d)
    return list(dict.fromkeys(out))


def enter_venv() -> bool:
    """What `site` does for a venv at start, which `-S` leaves out: sys.prefix and
    sys.exec_prefix become the venv (the directory above the interpreter's, where a
    `pyvenv.cfg` is beside or above the interpreter). Whether the venv includes the
    system's site-packages."""
    exe_dir = os.path.dirname(os.path.abspath(sys.executable))
    venv = os.path.dirname(exe_dir)
    for cfg in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(venv, "pyvenv.cfg")):
        if os.path.isfile(cfg):
            break
    else:
        return False  # not a venv: the interpreter's own installation
    sys.prefix = sys.exec_prefix = venv
    system_site = False
    try:
        with open(cfg, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key.strip().lower() == "include-system-site-packages":
                    system_site = value.strip().lower() == "true"
    except OSError:
        pass
    return system_site


def _pth_dirs(sitedir: str) -> list[str]:
    """What `site.addpackage` would add for each `.pth` file of `sitedir`, without running
    any of it: lines that name directories (relative to `sitedir`) that exist."""
    out = []
    try:
        names = sorted(n for n in os.listdir(sitedir) if n.endswith(".pth") and not n.startswith("."))
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(sitedir, name), encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            line = line.rstrip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(("import ", "import\t")):
                SKIPPED_PTH.append(f"{os.path.join(sitedir, name)}: {line[:200]}")
                continue
            d = os.path.join(sitedir, line)
            if os.path.isdir(d):
                out.append(os.path.realpath(d))
    return out


def enter() -> None:
    """In a worker, once its job's sandbox is applied: the job's import path."""
    if JOB_PATH and sys.path != JOB_PATH:
        sys.path[:] = JOB_PATH
