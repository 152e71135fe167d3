"""Every ``meshagent ...`` command line of the documentation exists: its sub-commands
are in the real command tree and its options belong to the command.

Command lines are read from shell blocks (```sh, ```bash, ```console, or no language)
and from inline `code` of docs/*.md, README.md and examples/**/README.md, wherever
``meshagent`` stands where a shell would run it (start of a line, after ``sudo``,
``&&``, ``;``, ``|``, ``$(`` or a ``bin/`` path)."""

from __future__ import annotations

import re
import shlex
from typing import Any

import pytest
import typer

from meshagent.cli import app
from tests.docs.markdown import ROOT, code_spans, fenced_blocks, pages

SHELL = ("sh", "bash", "console", "shell", "")
_START = re.compile(r"(?:^|&&|;|\||\$\(|\(|\bsudo\s+|\bbin/)\s*(?:\$\s+)?meshagent(?=\s|$)")
_END = re.compile(r"\s#|[<>|;`)]|&&")


def command_lines() -> list[tuple[str, str]]:
    """(where, the words after ``meshagent``) for every command line in the pages."""
    found: list[tuple[str, str]] = []
    for page in pages():
        name = page.relative_to(ROOT)
        for block in fenced_blocks(page):
            if block.lang not in SHELL:
                continue
            text = block.text.replace("\\\n", " ")
            for offset, line in enumerate(text.splitlines(), 1):
                found += [(f"{name}:{block.line + offset}", rest) for rest in _after(line)]
        for number, span in code_spans(page):
            found += [(f"{name}:{number}", rest) for rest in _after(span)]
    return found


def _after(line: str) -> list[str]:
    out = []
    for match in _START.finditer(line):
        rest = line[match.end():]
        end = _END.search(rest)
        out.append(rest[: end.start()] if end else rest)
    return out


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:  # an unbalanced quote in prose
        return text.split()


def _options(command: Any) -> set[str]:
    names = {"--help"}
    for param in command.params:
        names.update(getattr(param, "opts", ()))
        names.update(getattr(param, "secondary_opts", ()))
    return {n for n in names if n.startswith("-")}


def resolve(words: list[str]) -> tuple[str, Any, list[str]]:
    """(command path, command, the words after it). Raises AssertionError for an unknown
    sub-command."""
    command: Any = typer.main.get_command(app)
    path = ["meshagent"]
    rest = list(words)
    while rest and getattr(command, "commands", None):
        word = rest[0]
        if word.startswith("-"):
            break
        assert word in command.commands, f"{' '.join(path)} has no command {word!r}"
        command = command.commands[word]
        path.append(rest.pop(0))
    return " ".join(path), command, rest


LINES = command_lines()


def test_the_pages_use_the_commands() -> None:
    assert len(LINES) > 40, LINES


@pytest.mark.parametrize(("where", "text"), LINES, ids=[w for w, _ in LINES])
def test_each_command_line_exists(where: str, text: str) -> None:
    try:
        path, command, rest = resolve(_words(text))
    except AssertionError as exc:
        raise AssertionError(f"{where}: meshagent {text.strip()}: {exc}") from None
    known = _options(command)
    for word in rest:
        if word.startswith("-") and not re.fullmatch(r"-+|-\d.*", word):
            option = word.split("=", 1)[0]
            assert option in known, f"{where}: {path} has no option {option} (it has {sorted(known)})"
