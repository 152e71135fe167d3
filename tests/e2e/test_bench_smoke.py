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


def test_compare_benchmark_smoke_run() -> None:
    """compare.py --smoke installs nothing: a peer whose package is missing (haproxy on
    a fresh CI machine) is a "not run: <reason>" row, and the rest still runs."""
    done = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), "--smoke"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    print(done.stdout[-6000:])  # what ran, and why a peer did not (pytest -rA shows it)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    scenarios = (
        "keep-alive", "paced keep-alive", "bursts", "app closes", "new conn", "paced conn",
        "bulk", "memory",
    )
    width = max(map(len, scenarios))
    for scenario in scenarios:
        for path in ("direct", "meshagent L4", "meshagent HTTP", "haproxy pair", "consul pair"):
            row = [line for line in lines if line.startswith(f"{scenario:{width}}  {path:14}")]
            assert row, f"no {scenario} row for {path}:\n{done.stdout[-3000:]}"
            if path.startswith("meshagent") or path == "direct":
                assert "not run" not in row[0], row[0]
    # What every path's sockets ran with: bbr paces each segment, which moves costs.
    header = next(line for line in lines if " CPUs, python " in line)
    assert ", TCP " in header, header
    # What each agent logged, under the table (errors there mean a bug, whatever the figures).
    for agent in ("l4-orders", "l4-web", "http-orders", "http-web"):
        assert any(f" {agent}: " in line and "at warning or above" in line for line in lines), agent
