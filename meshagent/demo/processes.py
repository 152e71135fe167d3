"""Real processes for the demo, the benchmarks and end-to-end tests: apps and agents,
stopped by pid.

An agent's readiness is read the way systemd reads it: the test owns a NOTIFY_SOCKET
and waits for READY=1 (bounded), so no test sleeps to guess when an agent is up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from meshagent.demo.ports import free_port


class Process:
    """A child process with its output in a file; ``stop()`` by pid, bounded."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


def start_app(
    mode: str, tmp: Path, *, port: int | None = None, name: str = "app", host: str = "127.0.0.1"
) -> tuple[Process, int]:
    """Start a stand-in app on ``host``; return it and its port once it listens."""
    port = port or free_port(host)
    log = tmp / f"app-{name}-{port}.log"
    proc = Process(
        [sys.executable, "-m", "meshagent.demo.apps", mode, "--host", host, "--port", str(port),
         "--name", name],
        log,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return proc, port
        except OSError:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"app {name} exited: {proc.output()}") from None
            time.sleep(0.05)
    proc.stop()
    raise RuntimeError(f"app {name} did not listen on {port} within 10 s")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def render_agent_toml(config: dict[str, Any]) -> str:
    """Render a dict shaped like agent.toml (tables and arrays of tables) as TOML."""
    lines: list[str] = []
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    arrays = {
        k: v for k, v in config.items() if isinstance(v, list) and v and isinstance(v[0], dict)
    }
    for key, value in config.items():
        if key not in tables and key not in arrays:
            lines.append(f"{key} = {toml_value(value)}")
    for key, table in tables.items():
        lines.append(f"[{key}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    for key, items in arrays.items():
        for item in items:
            lines.append(f"[[{key}]]")
            lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


class Agent(Process):
    """``meshagent run`` as a process, ready once it sent READY=1 on our NOTIFY_SOCKET."""

    def __init__(self, config: dict[str, Any], tmp: Path, name: str) -> None:
        self.name = name
        self.config_path = tmp / f"{name}.toml"
        self.config_path.write_text(render_agent_toml(config))
        # AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer.
        self.notify_path = Path(tempfile.mkdtemp(prefix="ma-")) / "notify"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        super().__init__(
            [sys.executable, "-m", "meshagent", "run", "--config", str(self.config_path)],
            tmp / f"{name}.log",
            env={"NOTIFY_SOCKET": str(self.notify_path)},
        )

    def wait_for(self, state: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.notify.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
            try:
                message = self.notify.recv(4096).decode()
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent {self.name} exited:\n{self.output()}") from None
                continue
            if state in message.split("\n"):
                return
        raise RuntimeError(f"agent {self.name}: no {state} within {timeout} s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        code = super().stop(sig, timeout)
        self.notify.close()
        self.notify_path.unlink(missing_ok=True)
        if self.notify_path.parent.exists():  # stop() may be called twice
            self.notify_path.parent.rmdir()
        return code
