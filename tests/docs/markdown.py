"""Small readers of the project's Markdown pages, for the tests of docs/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block: where it is, its language and its text."""

    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    """The pages whose examples must hold: docs/*.md, README.md, examples/**/README.md."""
    return [
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "README.md",
        *sorted((ROOT / "examples").rglob("README.md")),
    ]


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, in order (indented fences too, as in lists)."""
    blocks: list[Block] = []
    lines = path.read_text().splitlines()
    n = 0
    while n < len(lines):
        opening = _FENCE.match(lines[n])
        if opening is None:
            n += 1
            continue
        indent, fence, lang = opening[1], opening[2], opening[3].lower()
        body: list[str] = []
        end = n + 1
        while end < len(lines) and lines[end].strip() != fence:
            line = lines[end]
            body.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{n + 1}: unclosed code fence")
        blocks.append(Block(path, n + 1, lang, "\n".join(body) + "\n"))
        n = end + 1
    return blocks


def code_spans(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every inline `code` span outside fenced blocks."""
    spans: list[tuple[int, str]] = []
    inside = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if _FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            spans += [(number, m[1]) for m in re.finditer(r"`([^`]+)`", line)]
    return spans


_HEREDOC = re.compile(r"cat\s+>\s*(\S+\.(toml|json))\s+<<-?\s*'?(\w+)'?\s*$")


def heredoc_files(block: Block) -> list[Block]:
    """The files a shell block writes with ``cat > FILE.toml <<'EOF'`` (or .json), as
    blocks of that language, located at the ``cat`` line."""
    files: list[Block] = []
    lines = block.text.splitlines()
    for n, line in enumerate(lines):
        match = _HEREDOC.search(line)
        if match is None:
            continue
        try:
            end = lines.index(match[3], n + 1)
        except ValueError:
            raise AssertionError(f"{block.where}: here-document without {match[3]}") from None
        text = "\n".join(lines[n + 1 : end]) + "\n"
        files.append(Block(block.path, block.line + n + 1, match[2], text))
    return files
