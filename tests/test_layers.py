"""The import rules of docs/architecture.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "meshagent"

# package -> the meshagent packages (and top-level modules) it may import
ALLOWED: dict[str, set[str]] = {
    "snapshot": {"snapshot"},
    "config": {"config", "snapshot"},
    "policy": {"policy", "config", "snapshot"},
    "pki": {"pki"},
    "protocol": {"protocol"},
    "routing": {"routing", "snapshot"},
    "dataplane": {"dataplane", "snapshot", "pki", "protocol", "routing", "log"},
    "discovery": {"discovery", "log", "__init__"},
    "central": {
        "central", "discovery", "log", "systemd", "snapshot", "config", "policy", "pki", "__init__"
    },
}
PURE = {"snapshot", "config", "policy", "pki", "protocol", "routing"}
IO_LIBRARIES = {"trio", "httpx", "ssl", "asyncio"}  # socket.gethostname is fine


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "meshagent":
                found |= {f"meshagent.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layer_imports(package: str) -> None:
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "meshagent" and len(parts) > 1:
                assert parts[1] in ALLOWED[package], f"{path.relative_to(PACKAGE)} imports {name}"
            if package in PURE:
                assert parts[0] not in IO_LIBRARIES, f"{path.relative_to(PACKAGE)} imports {name}"
