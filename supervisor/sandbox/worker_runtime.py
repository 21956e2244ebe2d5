"""The worker runtime as jobs see it: a read-only copy of exactly what they import of the
supervisor's installation.

A job must not read, let alone import, the packages installed for the supervisor (its
venv holds websockets, typer, the test tools, and whatever else the operator put there).
Its worker still needs the worker runtime: the `worker` and `shared` packages and the
libraries they use: msgpack (the pipe), pyseccomp (the fork server builds the seccomp
filter with it) and orjson (JSON; optional: a worker on another Python minor version
cannot load this one's build and uses the standard library's json).
At start the supervisor copies those four into a directory of its own (a few hundred
KiB, a few milliseconds), readable by every job uid, and every fork server puts that
directory on its import path instead of the supervisor's site-packages. Nothing is
installed into an agent's environment.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from glob import glob

PACKAGES = ("worker", "shared", "msgpack", "orjson", "pyseccomp")  # packages or single modules
OPTIONAL = frozenset({"orjson", "pyseccomp"})  # (without pyseccomp: no seccomp filter, which doctor says)
PREFIX = "arcp-runtime-"


class WorkerRuntime:
    """The copy, made by `build()` and removed by `close()`."""

    def __init__(self) -> None:
        self.path: str | None = None

    def build(self, where: str | None = None) -> str:
        remove_left_behind(where)
        path = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=where)
        try:
            for name in PACKAGES:
                source = package_dir(name)
                if source is None:
                    if name in OPTIONAL:
                        continue
                    raise OSError(f"the worker runtime needs the {name!r} package, which is not installed")
                if os.path.isdir(source):
                    shutil.copytree(source, os.path.join(path, name), symlinks=False,
                                    ignore=shutil.ignore_patterns("*.pyi", "py.typed"))
                else:
                    shutil.copy2(source, os.path.join(path, os.path.basename(source)))
            _readable_by_all(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        self.path = path
        return path

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None


def package_dir(name: str) -> str | None:
    """The directory of an importable package of this interpreter, or the file of a module
    (None: not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return os.path.realpath(list(spec.submodule_search_locations)[0])
    if spec.origin and spec.origin.endswith(".py") and os.path.isfile(spec.origin):
        return os.path.realpath(spec.origin)
    return None


def supervisor_package_dirs() -> list[str]:
    """Every directory of installed packages that jobs must neither import nor read: this
    interpreter's site-packages (its venv's and its base's), the user's, and the system
    Pythons' (Debian's dist-packages). A fork server leaves out those on its own import
    path (an agent environment built on one of them)."""
    dirs = set(site.getsitepackages()) | {site.getusersitepackages()}
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    dirs |= {paths["purelib"], paths["platlib"]}
    for pattern in ("/usr/lib/python3*/dist-packages", "/usr/lib/python3*/site-packages",
                    "/usr/local/lib/python3*/dist-packages", "/usr/local/lib/python3*/site-packages",
                    "/usr/lib64/python3*/site-packages", "/usr/local/lib64/python3*/site-packages"):
        dirs |= set(glob(pattern))
    return sorted({os.path.realpath(d) for d in dirs if d and os.path.isdir(d)})


def _readable_by_all(root: str) -> None:
    os.chmod(root, 0o755)
    for base, dirs, files in os.walk(root):
        for d in dirs:
            os.chmod(os.path.join(base, d), 0o755)
        for f in files:
            os.chmod(os.path.join(base, f), 0o644)


def remove_left_behind(where: str | None = None) -> None:
    """Copies left by supervisors that died without removing theirs."""
    for path in glob(os.path.join(where or tempfile.gettempdir(), PREFIX + "*")):
        m = re.fullmatch(re.escape(PREFIX) + r"(\d+)-.*", os.path.basename(path))
        if m is None or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
