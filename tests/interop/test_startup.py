"""Start-up: a broken agent or a port in use ends `run` with status 2 and one line naming it,
before anything is served; `doctor` checks agents the same way."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

from tests.conftest import EXE, ROOT


def _start(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, start_new_session=True)


def _error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in r.stderr.splitlines() if line.startswith("arcp-supervisor: error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_broken_agent_stops_run_before_it_binds(tmp_path: Path) -> None:
    (tmp_path / "bad_syntax.py").write_text("def agent(:\n")
    (tmp_path / "needs_missing.py").write_text("import a_module_nobody_installed\n\ndef agent(i, j):\n    return 1\n")
    (tmp_path / "no_function.py").write_text("def other(i, j):\n    return 1\n")
    (tmp_path / "fine.py").write_text("def agent(i, j):\n    return 1\n")
    r = _start("run", "--port", "0", "--agent", "syntax@1.0.0=bad_syntax:agent",
               "--agent", "missing=needs_missing:agent", "--agent", "nofn=no_function:agent",
               "--agent", "fine=fine:agent", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "listening on" not in r.stdout
    line = _error_line(r)
    assert "agent syntax@1.0.0 (bad_syntax:agent): SyntaxError" in line, line
    assert "agent missing@0.0.0 (needs_missing:agent): ModuleNotFoundError" in line, line
    assert "a_module_nobody_installed" in line, line
    assert "agent nofn@0.0.0 (no_function:agent)" in line and "not a callable" in line, line
    assert "fine" not in line, line


def test_good_agents_start_as_before(tmp_path: Path) -> None:
    (tmp_path / "fine.py").write_text("def agent(i, j):\n    return 1\n")
    proc = subprocess.Popen([str(EXE), "run", "--port", "0", "--agent", "fine=fine:agent"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("arcp-supervisor listening on ws://127.0.0.1:")
    finally:
        proc.kill()
        proc.wait(10)


def test_a_port_in_use_is_one_line_and_status_2() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        r = _start("run", "--port", str(port), "--agent", "echo=tests.agents:echo")
    assert r.returncode == 2, r.stderr
    line = _error_line(r)
    assert f"127.0.0.1:{port}" in line and "in use" in line, line
    assert "Traceback" not in r.stderr


def test_doctor_checks_the_agents_it_is_given(tmp_path: Path) -> None:
    (tmp_path / "bad_syntax.py").write_text("def agent(:\n")
    (tmp_path / "fine.py").write_text("def agent(i, j):\n    return 1\n")
    r = _start("doctor", "--json", "--agent", "bad=bad_syntax:agent", "--agent", "fine=fine:agent", cwd=tmp_path)
    data = json.loads(r.stdout)
    assert r.returncode == 1 and data["ok"] is False, r.stdout
    assert any(line.startswith("agent bad@0.0.0 (bad_syntax:agent): FAILED: SyntaxError") for line in data["agents"])
    assert any(line.startswith("agent fine@0.0.0 (fine:agent): imports") for line in data["agents"])
