"""The test agents' own venvs (tests/agent_envs.py): what they can import, that they are built
once and reused, readable by other uids, and never left half-built."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import agent_envs
from tests.agent_envs import (EXTRA_PKG_VALUE, MARKER, VENVS, AgentEnvError, build_agent_venv, extra_package_venv,
                              httpx_venv, other_python, requirement)

IMPORTS = """
import importlib, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        found[name] = True
    except ModuleNotFoundError:
        found[name] = False
print(json.dumps({"found": found, "prefix": sys.prefix, "version": list(sys.version_info[:2])}))
"""


def _imports(python: str, *modules: str, cwd: Path) -> dict[str, object]:
    """Which of `modules` the venv's interpreter imports, run as a job would run it: from a
    directory of nothing (not the checkout), without PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    out = subprocess.run([python, "-c", IMPORTS, *modules], capture_output=True, text=True, timeout=60,
                         cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


def _venv(python: str) -> Path:
    return Path(python).parent.parent


def test_the_httpx_venv_imports_httpx_and_nothing_of_the_supervisors(httpx_python: str, tmp_path: Path) -> None:
    r = _imports(httpx_python, "httpx", "httpcore", "websockets", "typer", "pytest", "supervisor", "worker",
                 cwd=tmp_path)
    assert r["found"] == {"httpx": True, "httpcore": True, "websockets": False, "typer": False, "pytest": False,
                          "supervisor": False, "worker": False}, r
    assert Path(str(r["prefix"])) == _venv(httpx_python) and _venv(httpx_python).parent == VENVS


def test_the_extra_package_is_in_its_venv_only(extra_package_python: str, tmp_path: Path) -> None:
    out = subprocess.run([extra_package_python, "-c", "import arcp_extra_pkg; print(arcp_extra_pkg.VALUE)"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert out.returncode == 0 and out.stdout.strip() == EXTRA_PKG_VALUE, out.stderr
    assert importlib.util.find_spec("arcp_extra_pkg") is None
    assert _imports(extra_package_python, "httpx", "pytest", cwd=tmp_path)["found"] == {"httpx": False,
                                                                                        "pytest": False}


def test_a_second_build_reuses_the_finished_venv(httpx_python: str, extra_package_python: str) -> None:
    for python, build in ((httpx_python, httpx_venv), (extra_package_python, extra_package_venv)):
        marker = _venv(python) / MARKER
        before = marker.stat()
        t0 = time.monotonic()
        assert build() == python
        assert time.monotonic() - t0 < 2.0
        after = marker.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p for p in VENVS.iterdir() if p.name.startswith(".")], "a temporary build directory was left"


def test_the_venv_is_readable_by_other_uids_and_names_its_final_place(httpx_python: str) -> None:
    venv = _venv(httpx_python)
    for d in (VENVS, VENVS.parent):
        assert d.stat().st_mode & 0o005 == 0o005, d
    for dirpath, dirnames, filenames in os.walk(venv):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode in ((0o755,) if p.is_dir() else (0o644, 0o755)), (p, oct(mode))
    assert (venv / "bin" / "httpx").read_text().splitlines()[0] == f"#!{venv}/bin/python"
    assert f"/.{venv.name}." not in (venv / "pyvenv.cfg").read_text()


def test_a_venv_of_another_python_version(tmp_path: Path) -> None:
    python = other_python()
    if python is None:
        pytest.skip("no CPython >= 3.11 of another minor version than "
                    f"{sys.version_info.major}.{sys.version_info.minor} is installed")
    exe = build_agent_venv("other-python", python=python, requirements=[requirement("httpx")],
                           modules={"arcp_extra_pkg.py": f"VALUE = {EXTRA_PKG_VALUE!r}\n"})
    r = _imports(exe, "httpx", "arcp_extra_pkg", "pytest", cwd=tmp_path)
    assert r["found"] == {"httpx": True, "arcp_extra_pkg": True, "pytest": False}, r
    version = r["version"]
    assert isinstance(version, list) and version[0] == 3 and version[1] >= 11
    assert version[1] != sys.version_info.minor


def test_without_the_wheels_the_error_says_to_run_scripts_test(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setattr(agent_envs, "WHEELS", tmp_path / "wheels")
    with pytest.raises(AgentEnvError, match="run scripts/test"):
        build_agent_venv("no-wheels", requirements=[requirement("httpx")])
    assert not list(VENVS.glob("*no-wheels-*"))


def test_a_failed_build_leaves_nothing_behind() -> None:
    with pytest.raises(AgentEnvError, match="agent_env_requirements.txt"):
        build_agent_venv("broken", requirements=["arcp-no-such-project-here"])
    assert not list(VENVS.glob("*broken-*"))


def test_a_requirement_not_in_the_file_is_refused() -> None:
    assert requirement("HTTPX").startswith("httpx>=")
    with pytest.raises(AgentEnvError, match="not in"):
        requirement("arcp-no-such-project-here")
