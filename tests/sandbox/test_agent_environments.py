"""Agent environments: a job imports the standard library, the worker runtime, its agent's
code and its agent's own environment, nothing of the supervisor's; agents of different
environments run side by side; a broken environment stops `run` with a message naming the
agent, the interpreter and what failed."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import site
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agent_envs import EXTRA_PKG_VALUE, build_agent_venv, other_python
from tests.conftest import EXE, ROOT, Server
from tests.interop.client import sdk_session

SUPERVISOR_SITE = [p for p in site.getsitepackages() if os.path.isdir(p)]
SUPERVISOR_ONLY = ["websockets", "typer", "pytest", "anyio", "agentruntimecontrolprotocol"]


async def _run_all(url: str, jobs: list[tuple[str, Any]], timeout: float = 60) -> list[dict[str, Any]]:
    async with sdk_session(url) as (client, rec):
        handles = await asyncio.gather(*(client.submit(agent=agent, input=input) for agent, input in jobs))
        return [await rec.terminal(h.job_id, timeout=timeout) for h in handles]


def _result(term: dict[str, Any]) -> Any:
    assert term["type"] == "job.result", term
    return term["payload"]["result"]


def _probe_input() -> dict[str, Any]:
    reads = list(SUPERVISOR_SITE)
    for d in SUPERVISOR_SITE:
        reads += glob.glob(os.path.join(d, "websockets", "__init__.py"))
    return {"modules": ["websockets", "typer", "pytest", "msgpack", "worker", "shared"], "read": reads}


def _assert_sees_nothing_of_the_supervisor(probe: dict[str, Any]) -> None:
    for name in ("websockets", "typer", "pytest"):
        assert probe["imported"][name].startswith("ModuleNotFoundError"), (name, probe["imported"][name])
    for name in ("msgpack", "worker", "shared"):  # the worker runtime
        assert probe["imported"][name].startswith("ok"), (name, probe["imported"][name])
    for path, outcome in probe["read"].items():
        if outcome.startswith("entries:"):  # a directory: empty, the mount that hides it
            assert outcome == "entries: ", (path, outcome[:300])
        else:
            assert "Error" in outcome, (path, outcome)
    assert not any(p in probe["path"] for p in SUPERVISOR_SITE), probe["path"]


@pytest.fixture(scope="module")
def env_server(extra_package_python: str) -> Iterator[Server]:
    s = Server("--agent", "probe=tests.env_agents:probe",
               "--agent", "venvprobe=tests.env_agents:probe", "--agent-python", f"venvprobe={extra_package_python}",
               "--agent", "extra=tests.env_agents:extra", "--agent-python", f"extra={extra_package_python}")
    yield s
    s.stop()


def test_a_default_job_imports_the_runtime_and_nothing_the_supervisor_installed(env_server: Server) -> None:
    [term] = asyncio.run(_run_all(env_server.url, [("probe", _probe_input())]))
    _assert_sees_nothing_of_the_supervisor(_result(term))


def test_an_agent_runs_on_its_own_venv_and_imports_what_only_that_has(
        env_server: Server, extra_package_python: str) -> None:
    venv = str(Path(extra_package_python).parent.parent)
    extra, probe = asyncio.run(_run_all(env_server.url, [("extra", {}), ("venvprobe", _probe_input())]))
    assert _result(extra)["value"] == EXTRA_PKG_VALUE
    assert _result(extra)["prefix"] == venv
    _assert_sees_nothing_of_the_supervisor(_result(probe))  # its venv: still nothing of the supervisor's
    [default] = asyncio.run(_run_all(env_server.url, [("probe", {"modules": ["arcp_extra_pkg"]})]))
    assert _result(default)["imported"]["arcp_extra_pkg"].startswith("ModuleNotFoundError")


def test_two_environments_side_by_side_under_load(env_server: Server, extra_package_python: str) -> None:
    venv = str(Path(extra_package_python).parent.parent)
    jobs = [("extra", {}) if i % 2 else ("probe", {"modules": ["arcp_extra_pkg"]}) for i in range(120)]
    terms = asyncio.run(_run_all(env_server.url, jobs, timeout=120))
    for (agent, _), term in zip(jobs, terms):
        r = _result(term)
        if agent == "extra":
            assert r == {"value": EXTRA_PKG_VALUE, "prefix": venv, "version": r["version"]}
        else:  # never a worker of the other environment
            assert r["imported"]["arcp_extra_pkg"].startswith("ModuleNotFoundError"), r
            assert r["prefix"] != venv


def test_an_agent_on_another_python_minor_version(make_server: type[Server]) -> None:
    other = other_python()
    if other is None:
        pytest.skip("no CPython >= 3.11 of another minor version on this host")
    python = build_agent_venv("other-python", python=other, modules={"arcp_extra_pkg.py": f"VALUE = {EXTRA_PKG_VALUE!r}\n"})
    version = json.loads(subprocess.run([python, "-c", "import sys, json; print(json.dumps(sys.version_info[:2]))"],
                                        capture_output=True, text=True, timeout=60, check=True).stdout)
    s = make_server("--agent", "extra=tests.env_agents:extra", "--agent-python", f"extra={python}",
                    "--agent", "probe=tests.env_agents:probe", "--agent-python", f"probe={python}")
    extra, probe = asyncio.run(_run_all(s.url, [("extra", {}), ("probe", _probe_input())]))
    assert _result(extra) == {"value": EXTRA_PKG_VALUE, "prefix": str(Path(python).parent.parent),
                              "version": version}
    _assert_sees_nothing_of_the_supervisor(_result(probe))


def test_import_directories_of_an_agent_from_the_flag_and_the_config_file(
        tmp_path: Path, make_server: type[Server]) -> None:
    code = tmp_path / "agent code"
    code.mkdir()
    (code / "elsewhere_agent.py").write_text("def agent(input, job):\n    return {'from': __file__}\n")
    s = make_server("--agent", "away=elsewhere_agent:agent", "--agent-path", f"away={code}")
    [term] = asyncio.run(_run_all(s.url, [("away", {})]))
    assert _result(term) == {"from": str(code / "elsewhere_agent.py")}
    config = tmp_path / "arcp.toml"
    config.write_text('[[agents]]\nname = "away"\nentry = "elsewhere_agent:agent"\npath = ["agent code"]\n')
    s2 = make_server("--config", str(config))  # relative to the config file's directory
    [term] = asyncio.run(_run_all(s2.url, [("away", {})]))
    assert _result(term) == {"from": str(code / "elsewhere_agent.py")}


# -- a broken environment: `run` stops before it binds, naming the agent and the interpreter ----
def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), "run", "--port", "0", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=90, stdin=subprocess.DEVNULL, start_new_session=True)


def _error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "listening on" not in r.stdout
    lines = [line for line in r.stderr.splitlines() if line.startswith("arcp-supervisor: error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


def _old_python() -> str | None:
    """A CPython older than 3.11, to be refused."""
    for path in sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3.*") + glob.glob("/usr/bin/python3.*")):
        if not os.access(path, os.X_OK) or path.endswith("-config"):
            continue
        try:
            out = subprocess.run([path, "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"],
                                 capture_output=True, text=True, timeout=30).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if len(out) == 2 and (3, 7) <= (int(out[0]), int(out[1])) < (3, 11):
            return path
    return None


def test_a_missing_interpreter_is_refused_naming_the_flag(tmp_path: Path) -> None:
    line = _error(_run("--agent", "x=tests.env_agents:probe", "--agent-python", f"x={tmp_path}/nope/bin/python"))
    assert "--agent-python" in line and f"{tmp_path}/nope/bin/python does not exist" in line, line
    config = tmp_path / "c.toml"
    config.write_text('[[agents]]\nname = "x"\nentry = "tests.env_agents:probe"\npython = "nope/bin/python"\n')
    line = _error(_run("--config", str(config)))
    assert "agents[0].python" in line and "does not exist" in line, line
    line = _error(_run("--agent", "x=tests.env_agents:probe", "--agent-python", "y=/usr/bin/python3"))
    assert "no agent named 'y'" in line, line


def test_a_too_old_python_is_refused_naming_the_agent_and_the_interpreter() -> None:
    old = _old_python()
    if old is None:
        pytest.skip("no CPython older than 3.11 on this host")
    line = _error(_run("--agent", "x=tests.env_agents:probe", "--agent-python", f"x={old}"))
    assert "agent x@0.0.0" in line and old in line, line
    assert "is too old: the worker runtime needs 3.11 or newer" in line, line


def test_an_agent_whose_environment_lacks_its_import_is_refused(tmp_path: Path, extra_package_python: str) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "needs_thing.py").write_text("import a_package_this_venv_lacks\n\ndef agent(i, j):\n    return 1\n")
    line = _error(_run("--agent", "x=needs_thing:agent", "--agent-python", f"x={extra_package_python}",
                       "--agent-path", f"x={code}"))
    assert "agent x@0.0.0 (needs_thing:agent on " in line and extra_package_python in line, line
    assert "ModuleNotFoundError" in line and "a_package_this_venv_lacks" in line, line


def test_doctor_checks_every_environment(tmp_path: Path, extra_package_python: str) -> None:
    old = _old_python()
    args = ["--agent", "good=tests.env_agents:extra", "--agent-python", f"good={extra_package_python}",
            "--agent", "plain=tests.env_agents:probe"]
    if old is not None:
        args += ["--agent", "old=tests.env_agents:probe", "--agent-python", f"old={old}"]
    r = subprocess.run([str(EXE), "doctor", *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL, start_new_session=True)
    out = r.stdout
    assert f"agent good@0.0.0 (tests.env_agents:extra on {extra_package_python}): imports in a sandboxed worker" \
        in out, out[-2000:]
    assert "agent plain@0.0.0 (tests.env_agents:probe): imports in a sandboxed worker" in out, out[-2000:]
    assert "hidden-packages" in out and "guarantee supervisor-packages" in out, out[-3000:]
    if old is not None:
        assert r.returncode == 1
        assert f"agent old@0.0.0 (tests.env_agents:probe on {old}): FAILED: could not start a worker" in out, \
            out[-2000:]
        assert "too old" in out, out[-2000:]


def test_the_example_agent_builds_its_venv_and_fetches_through_the_proxy(
        tmp_path: Path, make_server: type[Server]) -> None:
    """examples/fetch_agent as the README gives it: build-venv.sh (here from the local wheels
    scripts/test downloaded: no network), then the agent registered with its interpreter and
    directory, fetching from a local server through the egress proxy."""
    from tests.agent_envs import WHEELS, base_python
    from tests.sandbox.test_egress import Origin

    example = ROOT / "examples" / "fetch_agent"
    env = {**os.environ, "PYTHON": base_python(), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(WHEELS),
           "PIP_CONFIG_FILE": os.devnull}
    built = subprocess.run(["bash", str(example / "build-venv.sh"), str(tmp_path / "venv")], env=env,
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert built.returncode == 0, built.stderr[-3000:]
    python = built.stdout.strip().splitlines()[-1]
    assert python == str(tmp_path / "venv" / "bin" / "python")
    origin = Origin()
    try:
        s = make_server("--agent", "webfetch=fetch_agent:fetch", "--agent-python", f"webfetch={python}",
                        "--agent-path", f"webfetch={example}")

        async def go() -> tuple[dict[str, Any], dict[str, Any]]:
            async with sdk_session(s.url) as (client, rec):
                allowed = await client.submit(agent="webfetch", input={"url": f"http://127.0.0.1:{origin.port}/x"},
                                              lease_request={"net.fetch": [f"http://127.0.0.1:{origin.port}/x"]})
                refused = await client.submit(agent="webfetch", input={"url": f"http://127.0.0.1:{origin.port}/y"},
                                              lease_request={"net.fetch": [f"http://127.0.0.1:{origin.port}/x"]})
                return await rec.terminal(allowed.job_id, timeout=60), await rec.terminal(refused.job_id, timeout=60)

        allowed, refused = asyncio.run(go())
        r = _result(allowed)
        assert r["status"] == 200 and r["bytes"] == len(b"hello from /x"), r
        assert _result(refused)["status"] == 403
    finally:
        origin.close()


def test_an_agent_venvs_start_up_code_never_runs_outside_the_sandbox(
        tmp_path: Path, make_server: type[Server]) -> None:
    """A venv's .pth lines that are code and its sitecustomize run at interpreter start, and
    a module in an agent's import directory that shadows the standard library runs when
    imported: none of it may run in the fork server (root, not sandboxed), only in jobs. A
    .pth line that names a directory still puts it on the job's import path."""
    from tests.agent_envs import base_python

    venv = tmp_path / "hostile-venv"
    subprocess.run([base_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    [sp] = glob.glob(str(venv / "lib" / "python3.*" / "site-packages"))
    markers = tmp_path / "markers"
    markers.mkdir()
    (Path(sp) / "aaa_hostile.pth").write_text(
        f"import os; open({str(markers / 'pth')!r}, 'w').write(str(os.getuid()))\nextra_code\n")
    (Path(sp) / "extra_code").mkdir()
    (Path(sp) / "extra_code" / "from_pth_dir.py").write_text("VALUE = 'named by a .pth line'\n")
    (Path(sp) / "sitecustomize.py").write_text(f"open({str(markers / 'sitecustomize')!r}, 'w').write('ran')\n")
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    for name in ("sysconfig", "tempfile", "json", "socket"):
        (shadow / f"{name}.py").write_text(f"open({str(markers / name)!r}, 'w').write('ran')\n"
                                           "raise ImportError('shadowed')\n")
    for p in [venv, *venv.rglob("*"), shadow, *shadow.iterdir()]:
        if not p.is_symlink():  # (bin/python is one, to the interpreter itself)
            p.chmod(0o755 if p.is_dir() else 0o644)
    python = str(venv / "bin" / "python")
    s = make_server("--agent", "probe=tests.env_agents:probe", "--agent-python", f"probe={python}",
                    "--agent-path", f"probe={shadow}")
    [term] = asyncio.run(_run_all(s.url, [("probe", {"modules": ["from_pth_dir"]})]))
    r = _result(term)
    assert r["imported"]["from_pth_dir"].startswith("ok"), r["imported"]
    assert str(Path(sp) / "extra_code") in r["path"] or os.path.realpath(Path(sp) / "extra_code") in r["path"]
    assert sorted(os.listdir(markers)) == [], "code of the agent's environment ran outside its sandbox"
    s.wait_stderr("a .pth line that is code is not run")
