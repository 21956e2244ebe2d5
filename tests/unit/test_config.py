"""supervisor/config/ and supervisor/cli.py build_config: every problem names its flag or key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from supervisor.cli import build_config
from supervisor.config import (
    GiB, KiB, MiB, AgentSpec, Config, ConfigError, Limits, check, load_file, parse_agent_flag, parse_size,
    parse_uid_range,
)

ECHO = "echo@1.0.0=tests.agents:echo"


# -- parse_size ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2G", 2048 * MiB), ("2g", 2 * GiB), ("2GiB", 2 * GiB), ("2GB", 2 * GiB), ("256K", 256 * KiB),
        ("256M", 256 * MiB), ("512", 512), (" 64k ", 64 * KiB), ("1 M", MiB), (4096, 4096),
    ],
)
def test_parse_size(text: Any, expected: int) -> None:
    assert parse_size(text, "--memory") == expected


@pytest.mark.parametrize("text", ["lots", "", "0", "-1", "1.5G", "10T", "G", "2 G B", 0, -5, True, 1.5, None, [1]])
def test_parse_size_rejects_naming_flag(text: Any) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_size(text, "--memory")
    assert str(ei.value).startswith("--memory")


def test_parse_size_rejects_bare_ib() -> None:
    with pytest.raises(ConfigError):
        parse_size("2iB", "--memory")


# -- agents and uid ranges ---------------------------------------------------------------------------

def test_parse_agent_flag() -> None:
    a = parse_agent_flag("echo@1.2.3=tests.agents:echo", Limits())
    assert (a.name, a.version, a.entry, a.ref) == ("echo", "1.2.3", "tests.agents:echo", "echo@1.2.3")
    assert parse_agent_flag("echo=tests.agents:echo", Limits()).version == "0.0.0"


@pytest.mark.parametrize("text", ["echo", "=tests.agents:echo", "bad name=m:f", "echo=module",
                                  "echo=m:f:g", "echo=1m:f", "echo@1 0=m:f"])
def test_parse_agent_flag_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="--agent"):
        parse_agent_flag(text, Limits())


def test_parse_agent_flag_rejects_empty_version() -> None:
    with pytest.raises(ConfigError, match="--agent"):
        parse_agent_flag("echo@=m:f", Limits())


def test_parse_uid_range() -> None:
    import pwd

    taken = {u.pw_uid for u in pwd.getpwall()}
    first = next(u for u in range(200000, 300000, 1000) if not any(u <= t < u + 1000 for t in taken))
    assert parse_uid_range(f"{first}-{first + 999}", "sandbox.job_uids") == (first, first + 999)
    for bad in ["0-5", "5-1", "a-b", "5", 5, None, "1-2147483648"]:
        with pytest.raises(ConfigError, match="sandbox.job_uids"):
            parse_uid_range(bad, "sandbox.job_uids")
    owner = next(u for u in pwd.getpwall() if u.pw_uid > 0)
    with pytest.raises(ConfigError, match=f"belongs to user {owner.pw_name!r}"):
        parse_uid_range(f"{owner.pw_uid}-{owner.pw_uid}", "sandbox.job_uids")


# -- load_file ----------------------------------------------------------------------------------------

def write(tmp_path: Path, text: str | bytes) -> str:
    p = tmp_path / "arcp.toml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return str(p)


def test_load_full_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
host = "::1"
port = 9000
grace = 2
max_result_bytes = "8M"
chunk_size = 65536
ws_compression = true
metrics = false
usage = false

[auth]
tokens = { "secret" = "alice" }

[limits]
memory = "512M"
cpu_time = 60

[[agents]]
name = "echo"
version = "1.0.0"
entry = "tests.agents:echo"
default = true

[[agents]]
name = "big"
entry = "tests.agents:big_result"
limits = { memory = "2G" }

[sandbox]
job_uids = "20000-20999"
""")
    out = load_file(path)
    assert out["host"] == "::1" and out["port"] == 9000 and out["grace"] == 2
    assert out["max_result_bytes"] == 8 * MiB and out["chunk_size"] == 65536
    assert out["metrics"] is False and out["usage"] is False
    assert out["tokens"] == {"secret": "alice"}
    assert out["limits"] == Limits(memory=512 * MiB, cpu_time=60)
    echo, big = out["agents"]
    assert echo == AgentSpec("echo", "1.0.0", "tests.agents:echo", Limits(memory=512 * MiB, cpu_time=60), True)
    assert big.version == "0.0.0" and big.limits.memory == 2 * GiB and big.limits.cpu_time == 60
    assert out["job_uids"] == (20000, 20999)
    check(Config(**out))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server\nport = 1", "not valid TOML"),
        ("port = = 1", "not valid TOML"),
        ("[bogus]\nx = 1", "[bogus]"),
        ("server = 5", "[server]"),
        ("[server]\nbogus = 1", "server.bogus"),
        ("[server]\nport = \"7777\"", "server.port"),
        ("[server]\nport = true", "server.port"),
        ("[server]\nport = 1.5", "server.port"),
        ("[server]\nhost = 127", "server.host"),
        ("[server]\nstdio = 1", "server.stdio"),
        ("[server]\ngrace = \"1\"", "server.grace"),
        ("[server]\ngrace = true", "server.grace"),
        ("[server]\nchunk_size = \"big\"", "server.chunk_size"),
        ("[server]\nmax_result_bytes = true", "server.max_result_bytes"),
        ("[server]\nmax_result_bytes = 0", "server.max_result_bytes"),
        ("auth = 1", "[auth]"),
        ("[auth]\ntokens = [\"a\"]", "auth.tokens"),
        ("[auth]\ntokens = { a = 1 }", "auth.tokens"),
        ("[auth]\ntokens = { a = \"\" }", "auth.tokens"),
        ("limits = 1", "limits"),
        ("[limits]\nbogus = 1", "limits.bogus"),
        ("[limits]\nmemory = \"lots\"", "limits.memory"),
        ("[limits]\ncpu_time = 0", "limits.cpu_time"),
        ("[limits]\nmax_procs = \"64\"", "limits.max_procs"),
        ("[limits]\nmax_open_files = true", "limits.max_open_files"),
        ("agents = 1", "[[agents]]"),
        ("agents = [1]", "agents[0]"),
        ("[[agents]]\nname = \"e\"\nentry = \"m:f\"\nbogus = 1", "agents[0].bogus"),
        ("[[agents]]\nentry = \"m:f\"", "agents[0]"),
        ("[[agents]]\nname = \"e\"\nentry = 5", "agents[0]"),
        ("[[agents]]\nname = \"e\"\nentry = \"m:f\"\ndefault = \"yes\"", "agents[0].default"),
        ("[[agents]]\nname = \"e\"\nentry = \"m:f\"\nlimits = { memory = \"x\" }", "agents[0].limits.memory"),
        ("[[agents]]\nname = \"Bad Name\"\nentry = \"m:f\"", "agents[0]"),
        ("[[agents]]\nname = \"e\"\nentry = \"nocolon\"", "agents[0]"),
        ("[[agents]]\nname = \"e\"\nentry = \"m:f\"\n[[agents]]\nname = \"f\"\nentry = \"bad\"", "agents[1]"),
        ("sandbox = 1", "[sandbox]"),
        ("[sandbox]\nbogus = 1", "sandbox.bogus"),
        ("[sandbox]\njob_uids = \"9-1\"", "sandbox.job_uids"),
    ],
)
def test_load_file_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_file(write(tmp_path, text))
    assert needle in str(ei.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_file(str(tmp_path / "absent.toml"))


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_file(str(tmp_path))


def test_load_file_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_file(write(tmp_path, b'[server]\nhost = "\xff"\n'))


# -- check --------------------------------------------------------------------------------------------

def cfg(**over: Any) -> Config:
    base: dict[str, Any] = {"agents": (parse_agent_flag(ECHO, Limits()),)}
    base.update(over)
    return Config(**base)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.9.9.9", "localhost", "::1", "[::1]"])
def test_loopback_without_tokens_ok(host: str) -> None:
    check(cfg(host=host))


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com", "localhost.evil.com"])
def test_non_loopback_needs_tokens(host: str) -> None:
    with pytest.raises(ConfigError, match="--host"):
        check(cfg(host=host))
    check(cfg(host=host, tokens={"t": "alice"}))
    check(cfg(host=host, stdio=True))


@pytest.mark.parametrize(
    ("over", "flag"),
    [
        ({"port": -1}, "--port"), ({"port": 65536}, "--port"), ({"path": "arcp"}, "--path"),
        ({"grace": -0.1}, "--grace"), ({"reuse_workers": 0}, "--reuse-workers"),
        ({"heartbeat_interval": 0}, "--heartbeat-interval"), ({"chunk_size": 1023}, "--chunk-size"),
        ({"agents": ()}, "--agent"), ({"defaults": ("echo@9.9.9",)}, "--default echo@9.9.9"),
        ({"defaults": ("nosuch@1.0.0",)}, "--default"),
    ],
)
def test_check_rejects(over: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as ei:
        check(cfg(**over))
    assert str(ei.value).startswith(flag)


def test_check_duplicate_agent() -> None:
    a = parse_agent_flag(ECHO, Limits())
    with pytest.raises(ConfigError, match="twice"):
        check(cfg(agents=(a, replace(a, entry="tests.agents:sync_echo"))))


def test_check_accepts_port_zero_and_known_default() -> None:
    check(cfg(port=0, defaults=("echo@1.0.0",)))


# -- build_config (the flag layer) ---------------------------------------------------------------------

def flags(**over: Any) -> dict[str, Any]:
    f: dict[str, Any] = {"agent": [ECHO]}
    f.update(over)
    return f


def test_build_config_defaults() -> None:
    c = build_config(flags())
    assert c.host == "127.0.0.1" and c.port == 7777 and c.limits == Limits()
    assert c.agents[0].ref == "echo@1.0.0" and c.tokens == {}


def test_build_config_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
port = 9000
[auth]
tokens = { "filetoken" = "bob" }
[limits]
memory = "512M"
[[agents]]
name = "file"
entry = "tests.agents:echo"
""")
    c = build_config(flags(config=path, port=0, memory="2G", token=["t=alice"], max_result_bytes="1M",
                           chunk_size="64K", cpu_time=10))
    assert c.port == 0
    assert c.limits.memory == 2 * GiB and c.limits.cpu_time == 10
    assert {a.ref for a in c.agents} == {"file@0.0.0", "echo@1.0.0"}
    assert all(a.limits.memory == 2 * GiB for a in c.agents)
    assert c.tokens == {"filetoken": "bob", "t": "alice"}
    assert c.max_result_bytes == MiB and c.chunk_size == 64 * KiB


@pytest.mark.parametrize(
    ("over", "flag"),
    [
        ({"memory": "lots"}, "--memory"),
        ({"max_file_size": "1.5G"}, "--max-file-size"),
        ({"max_result_bytes": "x"}, "--max-result-bytes"),
        ({"chunk_size": "-1"}, "--chunk-size"),
        ({"cpu_time": 0}, "--cpu-time"),
        ({"max_procs": -1}, "--max-procs"),
        ({"max_open_files": 0}, "--max-open-files"),
        ({"token": ["notoken"]}, "--token"),
        ({"token": ["=alice"]}, "--token"),
        ({"token": ["t="]}, "--token"),
        ({"agent": ["echo"]}, "--agent"),
        ({"agent": []}, "--agent"),
        ({"retention_jobs": 0}, "--retention-jobs"),
        ({"resume_window": -1}, "--resume-window"),
        ({"default": ["echo@2.0.0"]}, "--default"),
        ({"host": "0.0.0.0"}, "--host"),
        ({"port": 70000}, "--port"),
    ],
)
def test_build_config_errors_name_the_flag(over: dict[str, Any], flag: str) -> None:
    with pytest.raises(ConfigError) as ei:
        build_config(flags(**over))
    assert str(ei.value).startswith(flag)


def test_build_config_host_with_token() -> None:
    c = build_config(flags(host="0.0.0.0", token=["s3cret=alice"]))
    assert c.tokens == {"s3cret": "alice"}


@pytest.mark.parametrize("text, needle", [
    ('[credentials]\nprovisioner = 3\n', "credentials.provisioner"),
    ('[credentials]\nprovisioner = "no colon"\n', "credentials.provisioner"),
    ('[credentials]\nprovisioner = "static"\noptions = 1\n', "credentials.options"),
    ('[credentials]\nbogus = 1\n', "credentials.bogus"),
])
def test_credentials_section_errors(tmp_path: Path, text: str, needle: str) -> None:
    from supervisor.config import ConfigError, load_file

    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_file(str(f))


def test_credentials_section_loads(tmp_path: Path) -> None:
    from supervisor.config import load_file

    f = tmp_path / "c.toml"
    f.write_text('[credentials]\nprovisioner = "static"\n[credentials.options]\nprofile = "p"\n')
    out = load_file(str(f))
    assert out["credentials_provisioner"] == "static" and out["credentials_options"] == {"profile": "p"}


# -- --session-log-bytes ------------------------------------------------------------------------------

def test_session_log_bytes_from_flag_and_file(tmp_path: Path) -> None:
    assert build_config({"agent": [ECHO]}).session_log_bytes == 64 * MiB
    assert build_config({"agent": [ECHO], "session_log_bytes": "8M"}).session_log_bytes == 8 * MiB
    path = write(tmp_path, '[server]\nsession_log_bytes = "2G"\n')
    assert build_config({"agent": [ECHO], "config": path}).session_log_bytes == 2 * GiB
    assert build_config({"agent": [ECHO], "config": path, "session_log_bytes": "16M"}).session_log_bytes == 16 * MiB


@pytest.mark.parametrize(("flags", "toml", "needle"), [
    ({"session_log_bytes": "lots"}, None, "--session-log-bytes"),
    ({"session_log_bytes": "0"}, None, "--session-log-bytes"),
    ({"session_log_bytes": "512K"}, None, "--session-log-bytes: must be at least 1M"),
    ({}, "[server]\nsession_log_bytes = \"x\"", "server.session_log_bytes"),
    ({}, "[server]\nsession_log_bytes = true", "server.session_log_bytes"),
    ({}, "[server]\nsession_log_bytes = -1", "server.session_log_bytes"),
])
def test_bad_session_log_bytes_names_the_flag_or_key(tmp_path: Path, flags: dict[str, Any], toml: str | None,
                                                     needle: str) -> None:
    if toml is not None:
        flags = {**flags, "config": write(tmp_path, toml)}
    with pytest.raises(ConfigError) as ei:
        build_config({"agent": [ECHO], **flags})
    assert needle in str(ei.value)


@pytest.mark.parametrize("key", ["metrics", "usage"])
def test_observability_switches_must_be_booleans(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_file(write(tmp_path, f"[server]\n{key} = \"no\"\n"))
