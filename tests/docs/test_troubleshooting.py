"""docs/troubleshooting.md quotes error messages as the code writes them.

Each item of a list between ``<!-- messages -->`` and ``<!-- /messages -->`` starts with
a message in backticks: its fixed parts, with ``…`` where the code puts a value (a path,
a port, a reason). Each must still occur in one string literal of meshagent/ (an
f-string's fixed parts, in order), so that a reworded message fails here instead of
leaving the page behind."""

from __future__ import annotations

import ast
import re

import pytest

from tests.docs.markdown import ROOT

PAGE = ROOT / "docs" / "troubleshooting.md"
HOLE = "\x00"  # where an f-string puts a value


def source_strings() -> list[str]:
    """Every string literal of meshagent/*.py; an f-string's values become HOLE."""
    found: list[str] = []
    for path in sorted((ROOT / "meshagent").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.JoinedStr):
                found.append(
                    "".join(
                        v.value
                        if isinstance(v, ast.Constant) and isinstance(v.value, str)
                        else HOLE
                        for v in node.values
                    )
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.append(node.value)
    return found


def quoted_messages() -> list[tuple[int, str]]:
    """(line, message) of every item of the page's marked lists."""
    messages: list[tuple[int, str]] = []
    inside = False
    for number, line in enumerate(PAGE.read_text().splitlines(), 1):
        if line.strip() == "<!-- messages -->":
            assert not inside, f"troubleshooting.md:{number}: nested marker"
            inside = True
        elif line.strip() == "<!-- /messages -->":
            assert inside, f"troubleshooting.md:{number}: closing marker without opening"
            inside = False
        elif inside and line.startswith("* "):
            match = re.match(r"\* `([^`]+)`", line)
            assert match, f"troubleshooting.md:{number}: an item must start with `message`"
            messages.append((number, match[1]))
    assert not inside, "troubleshooting.md: a messages list is not closed"
    return messages


SOURCES = source_strings()
MESSAGES = quoted_messages()


def occurs(message: str) -> bool:
    parts = [p for p in message.split("…")]
    pattern = re.compile(".*?".join(re.escape(p) for p in parts), re.DOTALL)
    return any(pattern.search(text) for text in SOURCES)


def test_the_page_quotes_many_messages() -> None:
    assert len(MESSAGES) >= 100, len(MESSAGES)
    seen: dict[str, int] = {}
    for number, message in MESSAGES:
        assert message not in seen, f"troubleshooting.md:{number}: also on line {seen[message]}"
        seen[message] = number


@pytest.mark.parametrize(("number", "message"), MESSAGES, ids=[f"line {n}" for n, _ in MESSAGES])
def test_each_quoted_message_is_in_the_code(number: int, message: str) -> None:
    assert occurs(message), f"troubleshooting.md:{number}: `{message}` is not in meshagent/ any more"


def test_values_are_holes_and_text_is_not() -> None:
    assert occurs("… may not call …: no TrafficPermission allows it")
    assert not occurs("orders may not call web: no TrafficPermission allows it")
    assert not occurs("this message was never written")
