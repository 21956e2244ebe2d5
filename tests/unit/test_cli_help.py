"""Help at 80 columns: every option name is shown whole (rich cuts a cell that does not fit with "…")."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import typer.main

from supervisor.cli import app
from tests.conftest import EXE, ROOT

COMMANDS = ("run", "doctor", "submit", "jobs", "watch", "cancel", "top")


def option_names(command: str) -> list[str]:
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]  # (a group)
    return sorted({name for p in cmd.params for name in (*p.opts, *p.secondary_opts) if name.startswith("--")})


def help_text(command: str, columns: int) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TERMINAL_WIDTH", "FORCE_COLOR", "TYPER_USE_RICH")}
    env.update(COLUMNS=str(columns), NO_COLOR="1", TERM="dumb")
    r = subprocess.run([str(EXE), command, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_at_80_columns_shows_every_option_name_whole(command: str) -> None:
    text = help_text(command, 80)
    assert max(len(line) for line in text.splitlines()) <= 80, text
    cut = re.findall(r"--[\w-]*…", text)
    assert not cut, f"option names cut short: {cut}\n{text}"
    names = option_names(command)
    assert len(names) >= 2, names  # --url and --token at least
    for name in names + ["--help"]:
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), f"{name} missing\n{text}"


def test_run_help_shows_help_texts_as_written() -> None:
    """`[@VERSION]` is text, not markup that would be dropped."""
    text = help_text("run", 80)
    assert "NAME[@VERSION]=MODULE:FUNCTION" in text
    assert "--heartbeat-interval" in text and "--back-pressure-threshold" in text
    assert "--ws-compression" in text and "--no-ws-compression" in text
