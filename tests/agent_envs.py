"""Venvs of the test agents' own (`[[agents]] python = ...`): built offline from the wheels
scripts/test downloads into .cache/wheels (from tests/agent_env_requirements.txt), cached in
.cache/agent-venvs/<name>-<hash of what went into it>, and readable by the jobs' uids.

A venv is built in a temporary directory beside its final place and renamed into place only
once finished, so a half-built one (a failed or interrupted build) is never reused."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
WHEELS = CACHE / "wheels"
VENVS = CACHE / "agent-venvs"
REQUIREMENTS_FILE = ROOT / "tests" / "agent_env_requirements.txt"
MARKER = ".agent-env.json"
"""Written into a venv last before it is renamed into place: what went into it."""

EXTRA_PKG_VALUE = "from the agent's own venv"
"""`arcp_extra_pkg.VALUE` in the `extra_package_python` venv (tests/conftest.py)."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_TIMEOUT = 300.0


class AgentEnvError(RuntimeError):
    """A venv could not be built; the message says why and what to do."""


def requirement(project: str) -> str:
    """The line of tests/agent_env_requirements.txt for `project` (e.g. "httpx>=0.27"): the
    fixtures ask for exactly what the downloaded wheels were chosen for."""
    want = _canonical(project)
    for raw in REQUIREMENTS_FILE.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if m and _canonical(m.group(0)) == want:
            return line
    raise AgentEnvError(f"{project} is not in {REQUIREMENTS_FILE}: add it there and run scripts/test, "
                        f"which downloads its wheels")


def base_python() -> str:
    """The real interpreter the supervisor's .venv was made from (not the .venv's python, whose
    site-packages a venv made from it would not see anyway, but whose path is the .venv's)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def build_agent_venv(name: str, *, requirements: Sequence[str] = (), modules: Mapping[str, str] = {},
                     python: str | None = None) -> str:
    """The path of `bin/python` of a venv of `python` (default: `base_python()`) holding
    `requirements` (installed offline from .cache/wheels) and `modules` (file name relative to
    site-packages -> source). Built once: a later call with the same interpreter, requirements,
    modules and downloaded wheels returns the same venv without touching it."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad venv name {name!r}")
    requirements = list(requirements)
    for rel in modules:
        parts = Path(rel).parts
        if not parts or Path(rel).is_absolute() or ".." in parts or not rel.endswith(".py"):
            raise ValueError(f"bad module file name {rel!r}: a relative path to a .py file in site-packages")
    interpreter = os.path.realpath(python or base_python())
    info = _python_info(interpreter)
    wheels = _wheel_names() if requirements else []
    if requirements and not wheels:
        raise AgentEnvError(f"no wheels in {WHEELS} to build the {name!r} venv from: run scripts/test "
                            f"(it downloads them for {REQUIREMENTS_FILE.relative_to(ROOT)}, the one step "
                            f"with network access)")
    inputs = {"python": interpreter, "version": info, "requirements": requirements,
              "modules": sorted(modules.items()), "wheels": wheels}
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    final = VENVS / f"{name}-{key}"
    exe = final / "bin" / "python"
    if (final / MARKER).is_file():
        return str(exe)

    for d in (CACHE, VENVS):
        d.mkdir(exist_ok=True)
        d.chmod(0o755)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.", dir=VENVS))
    try:
        _run([interpreter, "-m", "venv", "--without-pip", str(tmp)], f"making the {name!r} venv")
        site = Path(_run([str(tmp / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         f"asking the {name!r} venv for its site-packages").strip())
        if requirements:
            _install(tmp, site, requirements, name)
        for rel, source in modules.items():
            path = site / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source)
        if modules:
            _run([str(tmp / "bin" / "python"), "-m", "compileall", "-q", *(str(site / rel) for rel in modules)],
                 f"compiling the modules of the {name!r} venv")
        _relocate(tmp, final)
        (tmp / MARKER).write_text(json.dumps(inputs, indent=1, sort_keys=True) + "\n")
        _open_up(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():
                raise AgentEnvError(f"{final} is in the way and is not a finished venv: remove it") from None
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same venv first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(exe)


def httpx_venv() -> str:
    """The `httpx_python` fixture's venv: httpx (and its dependencies) only."""
    return build_agent_venv("httpx", requirements=[requirement("httpx")])


def extra_package_venv() -> str:
    """The `extra_package_python` fixture's venv: a module `arcp_extra_pkg` with
    `VALUE = EXTRA_PKG_VALUE`, which the supervisor's own venv does not have."""
    return build_agent_venv("extra-package", modules={"arcp_extra_pkg.py": f"VALUE = {EXTRA_PKG_VALUE!r}\n"})


@lru_cache(maxsize=None)
def other_python() -> str | None:
    """An installed CPython >= 3.11 of another minor version than the running one (the newest
    final release found), or None."""
    pyenv_roots = {os.environ.get("PYENV_ROOT") or "/root/.pyenv", "/root/.pyenv"}
    candidates = [p for root in sorted(pyenv_roots) for p in glob.glob(f"{root}/versions/*/bin/python3.*")]
    candidates += glob.glob("/usr/bin/python3.1*") + glob.glob("/usr/local/bin/python3.1*")
    found: dict[str, tuple[int, int, int, bool]] = {}
    for path in candidates:
        if not re.fullmatch(r"python3\.\d+", os.path.basename(path)) or not os.access(path, os.X_OK):
            continue
        real = os.path.realpath(path)
        if real in found:
            continue
        try:
            out = subprocess.run([real, "-c", "import sys; print(sys.implementation.name, *sys.version_info[:4])"],
                                 capture_output=True, text=True, timeout=10, env=_clean_env())
        except (OSError, subprocess.TimeoutExpired):
            continue
        fields = out.stdout.split()
        if out.returncode != 0 or len(fields) != 5 or fields[0] != "cpython":
            continue
        major, minor, micro = (int(x) for x in fields[1:4])
        if (major, minor) >= (3, 11) and minor != sys.version_info.minor and major == 3:
            found[real] = (major, minor, micro, fields[4] == "final")
    if not found:
        return None
    return max(found, key=lambda p: (found[p][3], found[p][:3]))


def _canonical(project: str) -> str:
    return re.sub(r"[-_.]+", "-", project).lower()


def _wheel_names() -> list[str]:
    return sorted(p.name for p in WHEELS.glob("*.whl")) if WHEELS.is_dir() else []


@lru_cache(maxsize=None)
def _python_info(interpreter: str) -> str:
    return _run([interpreter, "-c", "import sys; print(sys.implementation.name, sys.version)"],
                f"asking {interpreter} for its version").strip()


def _install(venv: Path, site: Path, requirements: list[str], name: str) -> None:
    """Offline, with the supervisor venv's own pip: `--python` (pip >= 22.3) installs for the
    venv's interpreter, an older pip puts the files into its site-packages with `--target`."""
    pip = [sys.executable, "-m", "pip"]
    where = ["--python", str(venv / "bin" / "python")] if _pip_version() >= (22, 3) else []
    args = ["install", "--no-input", "--disable-pip-version-check", "--no-cache-dir", "--no-index",
            "--find-links", str(WHEELS), "--only-binary=:all:", "-q"]
    if not where:
        args += ["--target", str(site)]
    try:
        _run([*pip, *where, *args, *requirements], f"installing {requirements} into the {name!r} venv")
    except AgentEnvError as e:
        raise AgentEnvError(f"{e}\nThe wheels in {WHEELS} are those of {REQUIREMENTS_FILE.relative_to(ROOT)}: "
                            f"a requirement must be listed there, then scripts/test downloads it") from None


def _pip_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", metadata.version("pip"))
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _relocate(tmp: Path, final: Path) -> None:
    """The venv's scripts and pyvenv.cfg name the directory it was built in: name its final one.
    (Compiled modules name it too, but Python corrects that on import.)"""
    old, new = os.fsencode(tmp), os.fsencode(final)
    for path in [tmp / "pyvenv.cfg", *(tmp / "bin").iterdir()]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data:
            path.write_bytes(data.replace(old, new))


def _open_up(top: Path) -> None:
    """0755 directories and executables, 0644 other files: jobs run under other uids."""
    top.chmod(0o755)
    for dirpath, dirnames, filenames in os.walk(top):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.stat(p).st_mode & 0o111 else 0o644)


def _clean_env() -> dict[str, str]:
    """The environment without what would point Python or pip elsewhere (no pip configuration
    file either: the host's may name indexes, and nothing here may reach the network)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PIP_", "PYTHON")) and k not in ("VIRTUAL_ENV", "__PYVENV_LAUNCHER__")}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _run(argv: list[str], what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, env=_clean_env(),
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AgentEnvError(f"{what} failed: {e}") from None
    if out.returncode != 0:
        raise AgentEnvError(f"{what} failed (exit {out.returncode}): {' '.join(argv)}\n"
                            f"{out.stdout}{out.stderr}".rstrip())
    return out.stdout
