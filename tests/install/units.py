"""Helpers for the unit-file tests: read a unit's keys, run ``systemd-analyze verify``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT_DIR = ROOT / "systemd"
INSTALLED_BINARY = "/opt/meshagent/venv/bin/meshagent"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or (
    "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
)


def meshagent_binary() -> str:
    """The meshagent entry point of the running venv: a real executable for ExecStart."""
    path = Path(sys.executable).parent / "meshagent"
    assert path.exists(), f"{path}: install the project first (pip install -e .)"
    return str(path)


def unit_keys(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value it is given, in order (systemd allows repeats)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def verify(unit: Path) -> str:
    """``systemd-analyze verify`` on ``unit``: its whole output. It exits 0 on unknown keys
    and bad values (they are only logged), so any output at all is a problem."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0 and not output:
        output = f"exit status {result.returncode}"
    return output


def seconds(text: str) -> float:
    """A systemd time span as seconds: "45s", "2min", "1h", or a bare number."""
    units = {"ms": 0.001, "s": 1, "min": 60, "h": 3600}
    for suffix in ("ms", "min", "s", "h"):
        if text.endswith(suffix):
            return float(text.removesuffix(suffix)) * units[suffix]
    return float(text)
