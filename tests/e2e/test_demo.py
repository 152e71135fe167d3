"""The README's first command, in short mode: the monolith strangled step by step; it
must meet every step and leave nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest


@pytest.mark.parametrize("consul", ["--consul", "--no-consul"])
def test_demo_meets_every_step_and_cleans_up(consul: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshagent", "demo", "--duration", "5", consul],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "result: every step met its expectation" in done.stdout
    assert "ok 100.0%" in done.stdout
    assert done.stdout.count("-> met") == 5 and "NOT met" not in done.stdout
    assert "/orders: orders v1  " in done.stdout and "orders v2" in done.stdout
    assert "refused (strict)" in done.stdout
    if consul == "--no-consul":
        assert "the central agent's inventory is the catalog" in done.stdout
    pids = [int(p) for p in re.findall(r"pid (\d+)", done.stdout)]
    assert len(pids) >= 4
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    workdir = re.search(r"configs and logs in (\S+)", done.stdout)
    assert workdir is not None
    assert not Path(workdir.group(1)).exists()


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGINT, ignored when started"])
def test_keep_running_stays_up_until_stopped_and_then_cleans_up(how: str) -> None:
    """Ctrl-C or SIGTERM stops the demo and every process it started; SIGINT too when
    it was started ignoring SIGINT (as a shell starts a background job: `demo &`)."""
    import os
    import signal
    import time

    import httpx

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    proc = subprocess.Popen(
        [sys.executable, "-m", "meshagent", "demo", "--duration", "2", "--no-consul",
         "--keep-running"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: a failure below stops it all
        preexec_fn=ignore_sigint if "ignored" in how else None,
    )
    lines: list[str] = []
    out = ""
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if "curl -s 127.0.0.1:" in line:
                break
        front = re.search(r"curl -s (127\.0\.0\.1:\d+)/orders/7", "".join(lines))
        assert front is not None, "".join(lines)
        answer = httpx.get(f"http://{front.group(1)}/orders/7", trust_env=False, timeout=10)
        assert answer.json()["version"] == "v2"  # the canary reached 100 %
        proc.send_signal(getattr(signal, how.split(",")[0]))
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the demo did not stop: its processes must not outlive it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
    text = "".join(lines) + out
    assert proc.returncode == 130, text
    assert "stopping every process of the demo" in text
    for pid in (int(p) for p in re.findall(r"pid (\d+)", text)):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
