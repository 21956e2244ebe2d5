"""Admission, runtime ceiling and operator settings: flags, TOML keys, their checks, and the
default memory budget read from /proc and the cgroup tree (fake trees here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from supervisor.cli import app, build_config
from supervisor.config import GiB, KiB, MiB, ConfigError, default_memory_budget, load_file, memory_available

ECHO = "echo@1.0.0=tests.agents:echo"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


FULL = """
[server]
max_jobs = 32
max_queued = 500
memory_budget = "8G"

[auth]
tokens = { "ta" = "alice", "tr" = "root" }
admins = ["root", "ops"]

[limits]
max_runtime = 600

[quotas]
max_jobs = 4

[quotas.principals]
alice = 8
"batch-user" = 1

[[agents]]
name = "echo"
entry = "tests.agents:echo"
limits = { max_runtime = 60 }
"""


def test_the_operating_keys_load(tmp_path: Path) -> None:
    c = build_config({"config": write(tmp_path, FULL)})
    assert (c.max_jobs, c.max_queued, c.memory_budget) == (32, 500, 8 * GiB)
    assert c.admins == ("root", "ops")
    assert c.quota_max_jobs == 4 and c.quota_principals == {"alice": 8, "batch-user": 1}
    assert c.limits.max_runtime == 600 and c.agents[0].limits.max_runtime == 60
    assert c.agents[0].limits.as_wire()["runtime_sec"] == 60


def test_defaults() -> None:
    c = build_config({"agent": [ECHO]})
    assert (c.max_jobs, c.max_queued, c.memory_budget) == (256, 10000, None)
    assert c.quota_max_jobs is None and c.quota_principals == {} and c.admins == ()
    assert c.limits.max_runtime == 3600 and c.agents[0].limits.as_wire()["runtime_sec"] == 3600


def test_flags_override_the_file(tmp_path: Path) -> None:
    c = build_config({"config": write(tmp_path, FULL), "max_jobs": 2, "max_queued": 0, "memory_budget": "512M",
                      "max_runtime": 5, "agent": [ECHO.replace("echo@", "other@")]})
    assert (c.max_jobs, c.max_queued, c.memory_budget) == (2, 0, 512 * MiB)
    assert c.limits.max_runtime == 5 and all(a.limits.max_runtime == 5 for a in c.agents)


@pytest.mark.parametrize(("text", "needle"), [
    ("[server]\nmax_jobs = 0", "server.max_jobs"),
    ("[server]\nmax_jobs = \"8\"", "server.max_jobs"),
    ("[server]\nmax_jobs = true", "server.max_jobs"),
    ("[server]\nmax_queued = -1", "server.max_queued"),
    ("[server]\nmax_queued = 1.5", "server.max_queued"),
    ("[server]\nmemory_budget = \"lots\"", "server.memory_budget"),
    ("[server]\nmemory_budget = 0", "server.memory_budget"),
    ("[limits]\nmax_runtime = 0", "limits.max_runtime"),
    ("[limits]\nmax_runtime = \"1h\"", "limits.max_runtime"),
    ("[[agents]]\nname = \"e\"\nentry = \"m:f\"\nlimits = { max_runtime = -5 }", "agents[0].limits.max_runtime"),
    ("[auth]\nadmins = \"root\"", "auth.admins"),
    ("[auth]\nadmins = [1]", "auth.admins"),
    ("[auth]\nadmins = [\"\"]", "auth.admins"),
    ("[auth]\nbogus = 1", "auth.bogus"),
    ("quotas = 1", "[quotas]"),
    ("[quotas]\nmax_jobs = 0", "quotas.max_jobs"),
    ("[quotas]\nmax_jobs = \"3\"", "quotas.max_jobs"),
    ("[quotas]\nbogus = 1", "quotas.bogus"),
    ("[quotas]\nprincipals = 3", "quotas.principals"),
    ("[quotas.principals]\nalice = 0", "quotas.principals.alice"),
    ("[quotas.principals]\nalice = true", "quotas.principals.alice"),
])
def test_bad_keys_are_named(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_file(write(tmp_path, text))
    assert needle in str(ei.value)


@pytest.mark.parametrize(("over", "flag"), [
    ({"max_jobs": 0}, "--max-jobs"),
    ({"max_jobs": -3}, "--max-jobs"),
    ({"max_queued": -1}, "--max-queued"),
    ({"memory_budget": "lots"}, "--memory-budget"),
    ({"memory_budget": "0"}, "--memory-budget"),
    ({"memory_budget": "512K"}, "--memory-budget"),
    ({"max_runtime": 0}, "--max-runtime"),
])
def test_bad_flags_are_named(over: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config({"agent": [ECHO], **over})
    assert str(ei.value).startswith(flag)


@pytest.mark.parametrize(("args", "flag"), [
    (["--max-jobs", "0"], "--max-jobs"),
    (["--max-jobs", "many"], "--max-jobs"),
    (["--max-queued", "-1"], "--max-queued"),
    (["--memory-budget", "12Q"], "--memory-budget"),
    (["--max-runtime", "0"], "--max-runtime"),
    (["--max-runtime", "1.5"], "--max-runtime"),
])
def test_the_command_line_exits_2_naming_the_flag(args: list[str], flag: str) -> None:
    res = CliRunner().invoke(app, ["run", "--agent", ECHO, *args], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 2
    assert flag in res.output + (res.stderr if res.stderr_bytes is not None else "")


# -- the default memory budget ------------------------------------------------------------------------

def fake_host(tmp_path: Path, mem_total_kb: int, self_cgroup: str, files: dict[str, str],
              v2: bool = False) -> tuple[str, str]:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal:       {mem_total_kb} kB\nMemFree:        1 kB\n")
    (proc / "self" / "cgroup").write_text(self_cgroup)
    root = tmp_path / "cgroup"
    root.mkdir()
    if v2:
        (root / "cgroup.controllers").write_text("cpu memory pids\n")
    for rel, text in files.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(proc), str(root)


V1_CGROUP = "9:pids:/\n4:memory:/svc/sup\n1:cpu,cpuacct:/\n0::/\n"
UNLIMITED_V1 = str(9223372036854771712)


def test_no_cgroup_limit_is_the_host_memory(tmp_path: Path) -> None:
    proc, root = fake_host(tmp_path, 16 * 1024 * 1024, V1_CGROUP, {
        "memory/memory.limit_in_bytes": UNLIMITED_V1, "memory/svc/sup/memory.limit_in_bytes": UNLIMITED_V1})
    assert memory_available(proc, root) == 16 * GiB
    assert default_memory_budget(proc, root) == 16 * GiB * 4 // 5


def test_v1_the_tightest_limit_of_the_group_and_its_parents(tmp_path: Path) -> None:
    proc, root = fake_host(tmp_path, 16 * 1024 * 1024, V1_CGROUP, {
        "memory/memory.limit_in_bytes": UNLIMITED_V1,
        "memory/svc/memory.limit_in_bytes": str(4 * GiB),
        "memory/svc/sup/memory.limit_in_bytes": str(6 * GiB)})
    assert memory_available(proc, root) == 4 * GiB
    assert default_memory_budget(proc, root) == 4 * GiB * 4 // 5


def test_a_cgroup_limit_above_the_host_is_the_host(tmp_path: Path) -> None:
    proc, root = fake_host(tmp_path, 1024 * 1024, V1_CGROUP, {"memory/svc/sup/memory.limit_in_bytes": str(8 * GiB)})
    assert memory_available(proc, root) == GiB


def test_v2_memory_max(tmp_path: Path) -> None:
    proc, root = fake_host(tmp_path, 16 * 1024 * 1024, "0::/app/sup\n", {
        "app/memory.max": "max\n", "app/sup/memory.max": f"{2 * GiB}\n"}, v2=True)
    assert memory_available(proc, root) == 2 * GiB
    proc, root = fake_host(tmp_path / "b", 16 * 1024 * 1024, "0::/app/sup\n", {"app/sup/memory.max": "max\n"},
                           v2=True)
    assert memory_available(proc, root) == 16 * GiB


def test_a_group_outside_the_mounts_view_counts_from_its_root(tmp_path: Path) -> None:
    """In a cgroup namespace /proc/self/cgroup may name a path the mount does not show."""
    proc, root = fake_host(tmp_path, 16 * 1024 * 1024, "0::/../elsewhere\n", {"memory.max": f"{3 * GiB}\n"},
                           v2=True)
    assert memory_available(proc, root) == 3 * GiB


def test_unreadable_proc_falls_back_to_sysconf(tmp_path: Path) -> None:
    n = memory_available(str(tmp_path / "none"), str(tmp_path / "none"))
    assert n > 64 * KiB
