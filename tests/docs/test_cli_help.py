"""Every command of ``meshagent`` shows an example in its ``--help``, and a mistyped
option is one ``error:`` line that says where the help is.

The command tree is walked from the real typer app, so a new command without an
example fails here."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from meshagent.cli import app


def subcommands(command: Any) -> dict[str, Any]:
    """A group's commands by name ({} for a command). typer keeps its own copy of
    click, so groups are recognised by their ``commands``, not by class."""
    return dict(getattr(command, "commands", {}))


def command_paths(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The path of every command and group under ``command``, itself included."""
    yield path
    for name, sub in sorted(subcommands(command).items()):
        yield from command_paths(sub, (*path, name))


ROOT = typer.main.get_command(app)
PATHS = list(command_paths(ROOT))


def _leaf(path: tuple[str, ...]) -> bool:
    command = ROOT
    for name in path:
        command = subcommands(command)[name]
    return not subcommands(command)


def test_the_tree_is_the_one_the_docs_describe() -> None:
    names = {" ".join(p) for p in PATHS if p}
    assert {"run", "check", "central", "mesh create", "token create", "get dataplanes",
            "pki issue", "policy validate", "status", "doctor", "demo"} <= names


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "meshagent")
def test_help_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output, f"meshagent {' '.join(path)} --help"


@pytest.mark.parametrize(
    "path", [p for p in PATHS if p and _leaf(p)], ids=lambda p: " ".join(p)
)
def test_a_mistyped_option_is_one_line_naming_the_help(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--no-such-option"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: no such option: --no-such-option — see: meshagent {' '.join(path)} --help"
    ], result.stderr


def test_an_unknown_command_is_one_line_naming_the_help() -> None:
    result = CliRunner().invoke(app, ["no-such-command"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no such command 'no-such-command' — see: meshagent --help"
