"""supervisor/cli.py through typer's CliRunner: exit codes and messages."""

from __future__ import annotations

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
