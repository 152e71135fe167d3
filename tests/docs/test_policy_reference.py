"""docs/policies.md describes the policy model as the code has it: a field table for
every Struct of ``meshagent.policy.model``, with exactly its fields, which are required,
and their defaults (decoded by the real decoder), every kind and every retry cause."""

from __future__ import annotations

import re
import tomllib
import typing
from typing import Any

import msgspec
import pytest

from meshagent.config.load import convert
from meshagent.policy import model
from tests.docs.markdown import ROOT

PAGE = ROOT / "docs" / "policies.md"
_MARK = re.compile(r"<!-- fields: (\w+) -->")


def tables() -> dict[str, list[list[str]]]:
    """Struct name -> rows (cells) of the table after its marker."""
    found: dict[str, list[list[str]]] = {}
    lines = PAGE.read_text().splitlines()
    for n, line in enumerate(lines):
        mark = _MARK.fullmatch(line.strip())
        if mark is None:
            continue
        assert mark[1] not in found, f"docs/policies.md:{n + 1}: {mark[1]} has two tables"
        rows = []
        for row in lines[n + 3 :]:  # the header and the --- line come first
            if not row.startswith("|"):
                break
            rows.append([c.strip() for c in row.strip().strip("|").split("|")])
        found[mark[1]] = rows
    return found


TABLES = tables()
STRUCTS = {
    name: cls
    for name, cls in vars(model).items()
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct) and not name.startswith("_")
}


def test_every_struct_of_the_model_has_a_table_and_nothing_else_does() -> None:
    assert set(TABLES) == set(STRUCTS)


def _code(cell: str) -> str:
    match = re.fullmatch(r"`(.+)`", cell)
    assert match, f"expected one `value` in {cell!r}"
    return match[1]


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_the_table_has_every_field_with_its_default(name: str) -> None:
    cls = STRUCTS[name]
    rows = {_code(r[0]): r for r in TABLES[name]}
    fields = msgspec.structs.fields(cls)
    assert list(rows) == [f.name for f in fields], f"{name}: fields, in the model's order"
    hints = typing.get_type_hints(cls)
    for field in fields:
        _, _, default, meaning = rows[field.name]
        assert meaning, f"{name}.{field.name}: no meaning"
        if field.required:
            assert default == "required", f"{name}.{field.name} is required"
            continue
        expected: Any = (
            field.default_factory() if field.default is msgspec.NODEFAULT else field.default
        )
        if expected is None:
            assert default == "none", f"{name}.{field.name}: default is none"
            continue
        written = tomllib.loads(f"v = {_code(default)}")["v"]
        decoded = convert(written, hints[field.name], source=f"{name}.{field.name}")
        assert decoded == expected, f"{name}.{field.name}: default {default} is not {expected!r}"


def test_every_kind_has_a_section() -> None:
    headings = re.findall(r"^## (\w+)$", PAGE.read_text(), flags=re.MULTILINE)
    assert set(model.KINDS) <= set(headings)


def test_every_retry_cause_is_explained() -> None:
    on = next(r for r in TABLES["Retry"] if r[0] == "`on`")
    for cause in typing.get_args(model.RetryOn):
        assert f'`"{cause}"`' in on[3], cause
