"""The README documents every command, option, environment variable and exit code."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from incus_caddyfile.cli import main
from incus_caddyfile.pipeline import Status

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
COMMANDS = sorted(main.commands)


def test_there_are_commands() -> None:
    assert "render" in COMMANDS


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_help_with_example(name: str) -> None:
    command = main.commands[name]
    assert command.help and "Example" in command.help
    assert f"incus-caddyfile {name}" in README


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_and_env_var_is_in_readme(name: str) -> None:
    for param in main.commands[name].params:
        if not isinstance(param, click.Option):
            continue
        for opt in param.opts + param.secondary_opts:
            if opt.startswith("--"):
                assert f"`{opt}" in README, f"{name} {opt} is not documented"
        if isinstance(param.envvar, str):
            assert param.envvar in README, f"{param.envvar} is not documented"


@pytest.mark.parametrize("status", list(Status))
def test_every_exit_code_is_in_readme(status: Status) -> None:
    assert f"| {status.value} |" in README
