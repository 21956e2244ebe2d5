"""supervisor/cli.py through typer's CliRunner: exit codes and messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from supervisor import __version__
from supervisor.cli import app

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, list(args), env=ENV)
    try:
        err = res.stderr
    except ValueError:  # stderr mixed into output
        err = ""
    return res.exit_code, res.output + err


def test_version() -> None:
    code, out = invoke("--version")
    assert code == 0
    assert f"arcp-supervisor {__version__}" in out


def test_port_not_a_number() -> None:
    code, out = invoke("run", "--port", "notanumber")
    assert code == 2
    assert "--port" in out


def test_unknown_flag() -> None:
    code, out = invoke("run", "--bogus-flag")
    assert code == 2
    assert "--bogus-flag" in out


def test_bad_memory() -> None:
    code, out = invoke("run", "--memory", "lots", "--agent", "e=tests.agents:echo")
    assert code == 2
    assert "--memory" in out and "lots" in out


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["run"], "--agent"),
        (["run", "--agent", "e=tests.agents:echo", "--host", "0.0.0.0"], "--host"),
        (["run", "--agent", "e=tests.agents:echo", "--default", "nope@1"], "--default"),
        (["run", "--agent", "bad name=m:f"], "--agent"),
        (["run", "--agent", "e=tests.agents:echo", "--token", "x"], "--token"),
        (["run", "--agent", "e=tests.agents:echo", "--cpu-time", "0"], "--cpu-time"),
    ],
)
def test_config_errors_exit_2(args: list[str], flag: str) -> None:
    code, out = invoke(*args)
    assert code == 2
    assert "arcp-supervisor: error:" in out and flag in out


def test_no_args_shows_help() -> None:
    code, out = invoke()
    assert code in (0, 2)
    assert "run" in out


def test_bad_session_log_bytes_exits_2() -> None:
    code, out = invoke("run", "--agent", "e=tests.agents:echo", "--session-log-bytes", "12Q")
    assert code == 2
    assert "arcp-supervisor: error:" in out and "--session-log-bytes" in out and "12Q" in out


# -- several supervisors on one database: --state-url and the --node-* options --------------------------

@pytest.mark.parametrize(
    ("args", "flags"),
    [
        (["--state-url", "mysql://u:secret@h/db"], ["--state-url"]),
        (["--state-url", "postgresql://u:secret@h/db", "--state-dir", "/tmp/arcp-state"],
         ["--state-url", "--state-dir"]),
        (["--node-id", "a b"], ["--node-id"]),
        (["--node-heartbeat", "0"], ["--node-heartbeat"]),
        (["--node-timeout", "-1"], ["--node-timeout"]),
        (["--node-heartbeat", "3", "--node-timeout", "5"], ["--node-timeout", "--node-heartbeat"]),
    ],
)
def test_node_options_errors_exit_2(args: list[str], flags: list[str]) -> None:
    code, out = invoke("run", "--agent", "e=tests.agents:echo", *args)
    assert code == 2
    assert "arcp-supervisor: error:" in out and all(f in out for f in flags)
    assert "secret" not in out


def test_node_options_in_a_bad_config_file_exit_2(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('[server]\nstate_url = "mysql://u:secret@h/db"\n')
    code, out = invoke("run", "--config", str(f), "--agent", "e=tests.agents:echo")
    assert code == 2
    assert "server.state_url" in out and "u:***@h/db" in out and "secret" not in out


def test_node_options_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    import supervisor.server.app

    seen: list[Any] = []
    monkeypatch.setattr(supervisor.server.app, "run", lambda cfg, reload=None: seen.append(cfg))
    code, out = invoke("run", "--agent", "e=tests.agents:echo", "--state-url", "postgres://u@h/db",
                       "--node-id", "n-1", "--node-heartbeat", "0.5", "--node-timeout", "1.5")
    assert code == 0, out
    (cfg,) = seen
    assert (cfg.state_url, cfg.node_id, cfg.node_heartbeat, cfg.node_timeout) == ("postgres://u@h/db", "n-1", 0.5, 1.5)
