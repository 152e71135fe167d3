"""The benchmark must keep running (it is not a test of speed: no figure is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "l4.py"


def test_l4_benchmark_smoke_run() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--seconds", "1", "--bulk-mib", "64"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for row in ("bulk      mesh", "connect   mesh", "echo      mesh"):
        assert row in done.stdout
