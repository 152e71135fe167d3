"""The benchmarks must keep running (they are not tests of speed: no figure is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_l4_benchmark_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "l4.py"), "--quick", "--seconds", "1", "--bulk-mib", "64"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for row in ("bulk      mesh", "connect   mesh", "echo      mesh"):
        assert row in done.stdout


def test_http_benchmark_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH / "http_keepalive.py"), "--quick", "--seconds", "1"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("direct  ") for line in lines), done.stdout[-2000:]
    assert any(line.startswith("mesh    ") for line in lines), done.stdout[-2000:]
    assert "mesh vs direct:" in done.stdout
