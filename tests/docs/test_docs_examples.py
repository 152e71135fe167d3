"""Every TOML and JSON example of the documentation is loaded by the real code.

The pages: docs/*.md, README.md and examples/**/README.md. A ```toml block, or a
.toml file that a shell block writes with a here-document, is, by its content:

* a policy document (``[[TrafficRoute]]``, ``[[TrafficPermission]]``, ``[[Timeout]]``,
  ``[[Retry]]``): ``meshagent.policy.load.load_document``;
* an agent.toml (``mesh =`` and ``[[inbound]]``, ``[[outbound]]`` or ``[central]``):
  ``load_toml(AgentConfig)`` + ``validate_agent``;
* a central.toml (``data_dir``): ``load_toml(CentralConfig)`` + ``validate_central``;
* a part of agent.toml or central.toml (only their keys): merged into the smallest
  valid file of its kind and checked the same way;
* anything else must say so on its first line (``# fragment``); those are counted, so
  unchecked blocks cannot silently grow.

A ```json block is a policy document. A failure names the page and the line of the block.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from meshagent.config.agent import AgentConfig, validate_agent
from meshagent.config.central import CentralConfig, validate_central
from meshagent.config.load import ConfigError, convert, load_toml
from meshagent.policy.load import PolicyError, load_document
from meshagent.policy.model import KINDS
from tests.docs.markdown import Block, fenced_blocks, heredoc_files, pages

FRAGMENT = "# fragment"
# Blocks marked "# fragment": raise this only with a reason in the block's first line.
EXPECTED_FRAGMENTS = 0

AGENT_KEYS = {f.name for f in msgspec.structs.fields(AgentConfig)}
CENTRAL_KEYS = {f.name for f in msgspec.structs.fields(CentralConfig)}
# The smallest valid files a part of one is merged into.
AGENT_BASE: dict[str, Any] = {"mesh": "shop"}
CENTRAL_BASE: dict[str, Any] = {"data_dir": "/var/lib/meshagent-central"}


def blocks() -> list[Block]:
    """Every ```toml and ```json block, and every .toml or .json file a shell block
    writes with a here-document (``cat > agent.toml <<'EOF'``)."""
    found: list[Block] = []
    for page in pages():
        for block in fenced_blocks(page):
            if block.lang in ("toml", "json"):
                found.append(block)
            elif block.lang in ("sh", "bash", "console", "shell", ""):
                found += heredoc_files(block)
    return found


BLOCKS = blocks()


def _agent(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(block.text)
    config = load_toml(path, AgentConfig)
    problems = validate_agent(config)
    assert not problems, f"{block.where}: agent.toml example: {problems}"


def _central(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "central.toml"
    path.write_text(block.text)
    problems = validate_central(load_toml(path, CentralConfig))
    assert not problems, f"{block.where}: central.toml example: {problems}"


def _part(block: Block, data: dict[str, Any]) -> str:
    """Check a part of agent.toml or central.toml; return which it was."""
    errors: list[str] = []
    if set(data) <= AGENT_KEYS:
        try:
            agent = convert({**AGENT_BASE, **data}, AgentConfig, source=block.where)
        except ConfigError as exc:
            errors.append(str(exc))
        else:
            problems = validate_agent(agent)
            if not problems:
                return "agent"
            errors += problems
    if set(data) <= CENTRAL_KEYS:
        try:
            central = convert({**CENTRAL_BASE, **data}, CentralConfig, source=block.where)
        except ConfigError as exc:
            errors.append(str(exc))
        else:
            problems = validate_central(central)
            if not problems:
                return "central"
            errors += problems
    raise AssertionError(
        f"{block.where}: not a valid part of agent.toml or central.toml "
        f"(or mark it {FRAGMENT!r}): {errors or sorted(data)}"
    )


def check(block: Block, tmp_path: Path) -> str:
    """Load ``block`` with the real code; return what it was taken for."""
    if block.text.startswith(FRAGMENT):
        return "fragment"
    if block.lang == "json":
        try:
            document = json.loads(block.text)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{block.where}: not valid JSON: {exc}") from None
        assert isinstance(document, dict) and set(document) & set(KINDS), (
            f"{block.where}: a JSON block must be a policy document"
        )
        _policy(block, f"{block.where}.json")  # load_document reads .json as JSON
        return "policy"
    try:
        data = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as exc:
        raise AssertionError(f"{block.where}: not valid TOML ({exc}); mark parts {FRAGMENT!r}") from None
    if set(data) & set(KINDS):
        _policy(block, block.where)
        return "policy"
    if "mesh" in data and set(data) & {"inbound", "outbound", "central"}:
        _agent(block, tmp_path)
        return "agent"
    if "data_dir" in data:
        _central(block, tmp_path)
        return "central"
    return _part(block, data)


def _policy(block: Block, source: str) -> None:
    try:
        resources = load_document(block.text.encode(), source=source)
    except PolicyError as exc:
        raise AssertionError(f"{block.where}: policy example refused:\n{exc}") from None
    assert resources, f"{block.where}: a policy document without resources"


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.where)
def test_every_example_loads(block: Block, tmp_path: Path) -> None:
    check(block, tmp_path)


def test_there_are_examples_of_every_kind(tmp_path: Path) -> None:
    found: dict[str, int] = {}
    for block in BLOCKS:
        kind = check(block, tmp_path)
        found[kind] = found.get(kind, 0) + 1
    assert found.get("fragment", 0) == EXPECTED_FRAGMENTS, (
        "the number of unchecked '# fragment' blocks changed: "
        + ", ".join(b.where for b in BLOCKS if b.text.startswith(FRAGMENT))
    )
    for kind in ("policy", "agent", "central"):
        assert found.get(kind, 0) > 0, f"no {kind} example found: {found}"


def test_a_broken_example_names_its_page_and_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```toml\n[[Retry]]\nname = \"r\"\nmesh = \"shop\"\n"
                    "destination = \"orders\"\nattempts = 11\n```\n")
    block = fenced_blocks(page)[0]
    block = Block(Path(__file__).resolve(), block.line, block.lang, block.text)
    with pytest.raises(AssertionError, match=r"(?s)test_docs_examples.py:3: .*attempts: must be 1..10"):
        check(block, tmp_path)
