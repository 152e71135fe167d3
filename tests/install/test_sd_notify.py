"""sd_notify as systemd speaks it: the test owns the NOTIFY_SOCKET datagram socket and
sets WATCHDOG_USEC / WATCHDOG_PID the way systemd would for a unit with WatchdogSec."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from meshagent import systemd
from meshagent.demo.central import CentralProcess
from tests.e2e.harness import agent_config, free_port, running, start_agent
from tests.support.pki import make_ca


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket, named in $NOTIFY_SOCKET (short path: AF_UNIX limit)."""
    directory = Path(tempfile.mkdtemp(prefix="ma-"))
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield sock
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()


def received(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    assert systemd.notify("READY=1")
    assert received(notify_socket) == ["READY=1"]


def test_notify_without_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")


def test_notify_to_a_vanished_socket_returns_false(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    assert not systemd.notify("READY=1")


async def test_watchdog_pings_every_half_interval(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # WatchdogSec=2s -> a ping per second
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with trio.move_on_after(10.5):
        await systemd.watchdog()
    assert received(notify_socket) == ["WATCHDOG=1"] * 11  # at 0, 1, ..., 10 s


async def test_watchdog_without_pid_pings(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    with trio.move_on_after(20):
        await systemd.watchdog()
    assert received(notify_socket) == ["WATCHDOG=1"] * 2


@pytest.mark.parametrize(
    ("usec", "pid"),
    [
        (None, None),  # no WatchdogSec
        ("2000000", "1"),  # inherited from a parent systemd watches (pid 1 is not us)
        ("0", None),
        ("soon", None),
    ],
)
async def test_watchdog_returns_at_once_when_not_asked(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    with trio.fail_after(1):
        await systemd.watchdog()
    assert received(notify_socket) == []


def test_agent_process_pings_the_watchdog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent started with WatchdogSec=1s: READY=1, then WATCHDOG=1 from its loop."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    ca = make_ca(tmp_path / "ca", "shop")
    config = agent_config("web", "127.0.0.1", ca, "web", consul=None,
                          outbound=[{"service": "orders", "port": free_port(),
                                     "endpoints": ["127.0.0.3:9"]}])
    agent = start_agent(config, tmp_path, "web")
    with running(agent):
        agent.wait_for("WATCHDOG=1", timeout=10)
        agent.wait_for("WATCHDOG=1", timeout=10)
    assert agent.proc.returncode == 0


async def test_watchdog_stops_when_told(
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
    autojump_clock: trio.testing.MockClock,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(systemd.watchdog, stop)
        await trio.sleep(2.5)
        stop.set()
    assert trio.current_time() == pytest.approx(2.5)  # returned at once, not at the next ping
    assert received(notify_socket) == ["WATCHDOG=1"] * 3


def wait_for_datagram(sock: socket.socket, state: str, timeout: float) -> None:
    sock.settimeout(timeout)
    try:
        while sock.recv(4096).decode() != state:
            pass
    finally:
        sock.setblocking(False)


def test_central_process_pings_and_stops_promptly(
    tmp_path: Path, notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The central agent (Type=notify) says READY=1 once serving, pings from its loop
    with WatchdogSec=1s, and the watchdog task does not hold it open after SIGTERM."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    central = CentralProcess(tmp_path)
    central.start()
    try:
        wait_for_datagram(notify_socket, "READY=1", timeout=10)
        wait_for_datagram(notify_socket, "WATCHDOG=1", timeout=10)
        wait_for_datagram(notify_socket, "WATCHDOG=1", timeout=10)
        started = time.monotonic()
        assert central.stop() == 0
        assert time.monotonic() - started < 3
    finally:
        central.stop()
