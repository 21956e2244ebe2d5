"""supervisor/reload.py (what a SIGHUP applies), --drain-timeout, and the stdio transport's file reads."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest

from supervisor.cli import build_config
from supervisor.config import AgentSpec, Config, ConfigError, Limits, load_file
from supervisor.reload import RELOADED, describe, merge
from supervisor.core.session import Oversized
from supervisor.server.transport_stdio import LINE_LIMIT, _read_file_line

ECHO = AgentSpec("echo", "1.0.0", "tests.agents:echo", Limits())
LATE = AgentSpec("late", "0.0.0", "tests.late_agents:hello", Limits())


def test_merge_applies_tokens_agents_and_limits_and_keeps_the_rest() -> None:
    running = Config(agents=(ECHO,), tokens={"a": "alice"}, port=7000, state_dir="/s", grace=1.0)
    loaded = Config(agents=(ECHO, LATE), tokens={"b": "bob"}, port=7001, state_dir="/t", grace=5.0,
                    limits=Limits(cpu_time=5))
    cfg, waiting = merge(running, loaded)
    assert cfg.agents == (ECHO, LATE) and cfg.tokens == {"b": "bob"} and cfg.limits.cpu_time == 5
    assert (cfg.port, cfg.state_dir, cfg.grace) == (7000, "/s", 1.0)
    assert waiting == ["grace", "port", "state_dir"]


def test_merge_of_the_same_file_changes_nothing() -> None:
    running = Config(agents=(ECHO,))
    assert merge(running, replace(running)) == (running, [])


def test_every_reloaded_setting_is_a_config_field() -> None:
    assert RELOADED <= set(Config.__dataclass_fields__)


def test_describe_names_agents_and_counts_tokens_without_showing_them() -> None:
    old = Config(agents=(ECHO,), tokens={"secret-one": "alice"})
    new = Config(agents=(LATE,), tokens={"secret-two": "bob", "secret-three": "carol"})
    text = describe(old, new)
    assert "agents added: late@0.0.0" in text and "agents removed: echo@1.0.0" in text
    assert "tokens: 2 (were 1)" in text and "secret" not in text
    assert describe(old, old) == "no change"


def test_drain_timeout_flag_and_key(tmp_path: Path) -> None:
    flags = {"agent": ["echo=tests.agents:echo"]}
    assert build_config(flags).drain_timeout == 30.0
    assert build_config({**flags, "drain_timeout": 2.5}).drain_timeout == 2.5
    f = tmp_path / "c.toml"
    f.write_text("[server]\ndrain_timeout = 7\n")
    assert load_file(str(f))["drain_timeout"] == 7
    with pytest.raises(ConfigError, match="--drain-timeout"):
        build_config({**flags, "drain_timeout": -1.0})
    f.write_text("[server]\ndrain_timeout = 'soon'\n")
    with pytest.raises(ConfigError, match="server.drain_timeout"):
        load_file(str(f))


def test_stdio_file_lines_and_an_oversized_one() -> None:
    big = b"x" * (LINE_LIMIT + 10)
    f = io.BytesIO(b'{"a":1}\n' + big + b"\n" + b'{"b":2}\n' + b'{"c":3}')
    assert _read_file_line(f) == b'{"a":1}\n'
    over = _read_file_line(f)
    assert isinstance(over, Oversized) and over.limit == LINE_LIMIT
    assert _read_file_line(f) == b'{"b":2}\n'
    assert _read_file_line(f) == b'{"c":3}'
    assert _read_file_line(f) is None
