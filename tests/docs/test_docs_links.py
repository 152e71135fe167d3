"""Relative links of the documentation lead somewhere: the file exists and, with a
``#fragment``, one of its headings has that anchor (GitHub's rule: lower case, spaces
to ``-``, other punctuation dropped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.markdown import ROOT, pages

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.MULTILINE)


def anchor(heading: str) -> str:
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {anchor(h) for h in _HEADING.findall(text)}


def links() -> list[tuple[str, Path, str]]:
    found = []
    for page in pages():
        text = page.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            for target in _LINK.findall(line):
                if "://" in target or target.startswith("mailto:"):
                    continue
                found.append((f"{page.relative_to(ROOT)}:{number}", page, target))
    return found


LINKS = links()


@pytest.mark.parametrize(("where", "page", "target"), LINKS, ids=[w for w, _, _ in LINKS])
def test_the_link_resolves(where: str, page: Path, target: str) -> None:
    file, _, fragment = target.partition("#")
    path = (page.parent / file).resolve() if file else page
    assert path.exists(), f"{where}: {target}: no such file"
    if fragment:
        assert path.suffix == ".md", f"{where}: {target}: an anchor in a non-Markdown file"
        assert fragment in anchors(path), f"{where}: {target}: no heading with that anchor"


def test_github_anchors() -> None:
    assert anchor("Policies: `meshagent apply`, `meshagent policy validate`, SIGHUP") == (
        "policies-meshagent-apply-meshagent-policy-validate-sighup"
    )
    assert anchor("1. The demo") == "1-the-demo"


def test_the_readme_links_every_page_of_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.partition("## Documentation")[2].partition("\n## ")[0]
    linked = set(_LINK.findall(section))
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README.md's Documentation list lacks docs/{page.name}"
