"""Several supervisors on one PostgreSQL database: --state-url, --node-id, --node-heartbeat and
--node-timeout (and their [server] keys), through load_file, check and build_config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from supervisor.cli import build_config
from supervisor.config import Config, ConfigError, load_file
from supervisor.config.settings import redact_url

ECHO = "echo@1.0.0=tests.agents:echo"
URL = "postgresql://arcp@db.internal:5432/arcp"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "arcp.toml"
    p.write_text(text)
    return str(p)


def build(tmp_path: Path | None = None, toml: str | None = None, **flags: Any) -> Config:
    if toml is not None:
        assert tmp_path is not None
        flags["config"] = write(tmp_path, toml)
    return build_config({"agent": [ECHO], **flags})


def test_defaults() -> None:
    c = build()
    assert (c.state_url, c.node_id, c.node_heartbeat, c.node_timeout) == (None, None, 2.0, 10.0)
    assert c.state_dir is None
    assert (Config().state_url, Config().node_id, Config().node_heartbeat, Config().node_timeout) == \
        (None, None, 2.0, 10.0)


def test_from_flags() -> None:
    c = build(state_url=URL, node_id="host-a.1:x_y", node_heartbeat=0.5, node_timeout=1.0)
    assert (c.state_url, c.node_id, c.node_heartbeat, c.node_timeout) == (URL, "host-a.1:x_y", 0.5, 1.0)


def test_from_file(tmp_path: Path) -> None:
    toml = f'[server]\nstate_url = "{URL}"\nnode_id = "b"\nnode_heartbeat = 3\nnode_timeout = 7.5\n'
    out = load_file(write(tmp_path, toml))
    assert out["state_url"] == URL and out["node_id"] == "b"
    assert out["node_heartbeat"] == 3.0 and isinstance(out["node_heartbeat"], float) and out["node_timeout"] == 7.5
    c = build(tmp_path, toml)
    assert (c.state_url, c.node_id, c.node_heartbeat, c.node_timeout) == (URL, "b", 3.0, 7.5)


def test_flags_override_file(tmp_path: Path) -> None:
    toml = '[server]\nstate_url = "postgres://a@h/one"\nnode_id = "file"\nnode_heartbeat = 1\nnode_timeout = 4\n'
    c = build(tmp_path, toml, state_url="postgresql://a@h/two", node_id="flag", node_heartbeat=2.0, node_timeout=5.0)
    assert (c.state_url, c.node_id, c.node_heartbeat, c.node_timeout) == ("postgresql://a@h/two", "flag", 2.0, 5.0)


@pytest.mark.parametrize("url", [
    "postgresql://", "postgres://h/db", "postgresql://u:p@h:5432/db?sslmode=require", "postgresql://[::1]:5432/db",
    "postgresql:///db?host=/run/postgresql",
])
def test_state_url_accepted(url: str) -> None:
    assert build(state_url=url).state_url == url


def test_node_options_without_state_url_are_kept() -> None:
    c = build(node_id="n1", node_heartbeat=1.0, node_timeout=3.0)
    assert c.state_url is None and (c.node_id, c.node_heartbeat, c.node_timeout) == ("n1", 1.0, 3.0)


def test_timeout_exactly_twice_the_heartbeat() -> None:
    assert build(node_heartbeat=2.5, node_timeout=5.0).node_timeout == 5.0


@pytest.mark.parametrize(("flags", "needle"), [
    ({"state_url": "sqlite:///var/lib/x"}, "--state-url"),
    ({"state_url": "mysql://u@h/db"}, "--state-url"),
    ({"state_url": "POSTGRESQL://h/db"}, "--state-url"),
    ({"state_url": "h/db"}, "--state-url"),
    ({"state_url": ""}, "--state-url"),
    ({"state_url": "postgresql://h/db?bogus=1"}, "--state-url"),
    ({"state_url": "postgresql://[::1/db"}, "--state-url"),
    ({"node_id": ""}, "--node-id"),
    ({"node_id": "a b"}, "--node-id"),
    ({"node_id": "a/b"}, "--node-id"),
    ({"node_id": "x" * 129}, "--node-id"),
    ({"node_id": "é"}, "--node-id"),
    ({"node_heartbeat": 0.0}, "--node-heartbeat"),
    ({"node_heartbeat": -1.0}, "--node-heartbeat"),
    ({"node_heartbeat": float("nan")}, "--node-heartbeat"),
    ({"node_heartbeat": float("inf"), "node_timeout": float("inf")}, "--node-heartbeat"),
    ({"node_timeout": 0.0}, "--node-timeout"),
    ({"node_timeout": -5.0}, "--node-timeout"),
    ({"node_heartbeat": 6.0}, "--node-timeout"),
    ({"node_heartbeat": 1.0, "node_timeout": 1.5}, "--node-timeout"),
])
def test_flag_errors_name_the_flag(flags: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        build(**flags)
    assert str(ei.value).startswith(needle)


def test_bad_scheme_says_what_is_expected() -> None:
    with pytest.raises(ConfigError, match=r"^--state-url: expected a PostgreSQL URL, postgresql://"):
        build(state_url="mysql://u@h/db")


def test_node_id_of_128_characters() -> None:
    assert build(node_id="x" * 128).node_id == "x" * 128


def test_timeout_error_names_both() -> None:
    with pytest.raises(ConfigError) as ei:
        build(node_heartbeat=3.0, node_timeout=5.0)
    msg = str(ei.value)
    assert "--node-timeout" in msg and "--node-heartbeat" in msg
    assert "server.node_timeout" in msg and "server.node_heartbeat" in msg


@pytest.mark.parametrize(("toml", "needle"), [
    ('state_url = "mysql://u@h/db"', "config key server.state_url"),
    ('state_url = 5', "config key server.state_url"),
    ('state_url = "postgresql://h/db?bogus=1"', "config key server.state_url"),
    ('node_id = ""', "config key server.node_id"),
    ('node_id = "a b"', "config key server.node_id"),
    ('node_id = 7', "config key server.node_id"),
    ('node_heartbeat = 0', "config key server.node_heartbeat"),
    ('node_heartbeat = -0.5', "config key server.node_heartbeat"),
    ('node_heartbeat = "2"', "config key server.node_heartbeat"),
    ('node_heartbeat = true', "config key server.node_heartbeat"),
    ('node_heartbeat = nan', "config key server.node_heartbeat"),
    ('node_timeout = 0', "config key server.node_timeout"),
    ('node_timeout = inf', "config key server.node_timeout"),
    ('node_timeout = "10"', "config key server.node_timeout"),
])
def test_file_errors_name_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_file(write(tmp_path, f"[server]\n{toml}\n"))
    assert str(ei.value).startswith(needle)


def test_file_timeout_below_twice_the_heartbeat(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        build(tmp_path, "[server]\nnode_heartbeat = 4\nnode_timeout = 6\n")
    assert "server.node_timeout" in str(ei.value) and "server.node_heartbeat" in str(ei.value)
    # a flag over the file may set it right
    assert build(tmp_path, "[server]\nnode_heartbeat = 4\nnode_timeout = 6\n", node_heartbeat=3.0).node_timeout == 6


# -- --state-url with --state-dir ---------------------------------------------------------------------

def test_state_url_and_state_dir_flags(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        build(state_url=URL, state_dir=str(tmp_path))
    msg = str(ei.value)
    assert msg.startswith("--state-url and --state-dir")


def test_state_url_and_state_dir_in_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_file(write(tmp_path, f'[server]\nstate_url = "{URL}"\nstate_dir = "/var/lib/arcp"\n'))
    msg = str(ei.value)
    assert "server.state_url" in msg and "server.state_dir" in msg


@pytest.mark.parametrize(("toml", "flags"), [
    ('[server]\nstate_dir = "/var/lib/arcp"\n', {"state_url": URL}),
    (f'[server]\nstate_url = "{URL}"\n', {"state_dir": "/var/lib/arcp"}),
])
def test_state_url_and_state_dir_from_file_and_flag(tmp_path: Path, toml: str, flags: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as ei:
        build(tmp_path, toml, **flags)
    msg = str(ei.value)
    assert "--state-url" in msg and "--state-dir" in msg
    assert "server.state_url" in msg and "server.state_dir" in msg


# -- the password is never shown ----------------------------------------------------------------------

@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
    ("postgres://u:secret@h:5432/db", "postgres://u:***@h:5432/db"),
    ("postgresql://u@h/db", "postgresql://u@h/db"),
    ("postgresql://h/db?sslmode=require&password=secret", "postgresql://h/db?sslmode=require&password=***"),
    ("mysql://u:secret@h/db", "mysql://u:***@h/db"),
    ("u:secret@h/db", "u:***@h/db"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", [
    "mysql://u:secret@h/db",
    "u:secret@h/db",
    "postgresql://u:se%ZZcret@h/db",
    "postgresql://u@h/db?password=se%ZZcret",
    "postgresql://u:secret@h/db?bogus=1",
])
def test_errors_do_not_show_the_password(tmp_path: Path, url: str) -> None:
    for attempt in (lambda: build(state_url=url), lambda: load_file(write(tmp_path, f'[server]\nstate_url = "{url}"\n'))):
        with pytest.raises(ConfigError) as ei:
            attempt()
        assert "secret" not in str(ei.value) and "***" in str(ei.value)


def test_conflict_error_does_not_show_the_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        build(state_url="postgresql://u:secret@h/db", state_dir=str(tmp_path))
    assert "secret" not in str(ei.value)
