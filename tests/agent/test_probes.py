"""probe_app against real loopback sockets, real files and real processes."""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path

import pytest
import trio

from meshagent.agent.probes import ProbeResult, probe_app
from meshagent.config.agent import HealthSettings, InboundSettings
from meshagent.config.load import Duration
from meshagent.demo.ports import free_port
from tests.support.net import read_head, serve_app


def _inbound(app_port: int = 1, app_host: str = "127.0.0.1", **health: object) -> InboundSettings:
    return InboundSettings(
        service="web",
        port=15001,
        app_port=app_port,
        app_host=app_host,
        health=HealthSettings(timeout=Duration(0.5), **health),  # type: ignore[arg-type]
    )


async def _serve(
    reply: bytes | None,
    requests: list[bytes],
    host: str = "127.0.0.1",
    *,
    task_status: trio.TaskStatus[int],
) -> None:
    """A tiny app: records each request head, answers ``reply`` (None: never answers)."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            request = await read_head(stream)
            if request is None:
                return
            requests.append(request[0])
            if reply is None:
                await trio.sleep_forever()
            await stream.send_all(reply)

    await serve_app(handle, host, task_status=task_status)


async def _start_app(
    nursery: trio.Nursery, reply: bytes | None, host: str = "127.0.0.1"
) -> tuple[int, list[bytes]]:
    requests: list[bytes] = []
    port: int = await nursery.start(_serve, reply, requests, host)
    return port, requests


async def test_no_probe_configured_means_agent_liveness() -> None:
    assert await probe_app(_inbound()) == ProbeResult(healthy=True, output="agent running")


async def test_tcp_probe(nursery: trio.Nursery) -> None:
    port, _ = await _start_app(nursery, b"")
    result = await probe_app(_inbound(port, tcp=True))
    assert result == ProbeResult(True, f"tcp 127.0.0.1:{port}: connected")

    closed = free_port()
    result = await probe_app(_inbound(closed, tcp=True))
    assert result == ProbeResult(False, f"tcp 127.0.0.1:{closed}: connection refused")


@pytest.mark.parametrize(
    ("status", "healthy"), [(200, True), (204, True), (302, True), (404, False), (503, False)]
)
async def test_http_probe_status(nursery: trio.Nursery, status: int, healthy: bool) -> None:
    reply = f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\n\r\n".encode()
    port, requests = await _start_app(nursery, reply)
    result = await probe_app(_inbound(port, http="/healthz"))
    assert result == ProbeResult(healthy, f"http 127.0.0.1:{port}/healthz: HTTP {status}")
    [request] = requests
    assert request.startswith(b"GET /healthz HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{port}\r\n".encode() in request


async def test_probes_go_to_the_app_host(nursery: trio.Nursery) -> None:
    """An app that listens on one address of the host only (not loopback's 127.0.0.1)."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    port, requests = await _start_app(nursery, reply, "127.0.0.2")
    result = await probe_app(_inbound(port, "127.0.0.2", tcp=True, http="/healthz"))
    assert result == ProbeResult(
        True, f"tcp 127.0.0.2:{port}: connected; http 127.0.0.2:{port}/healthz: HTTP 200"
    )
    [request] = requests
    assert f"\r\nHost: 127.0.0.2:{port}\r\n".encode() in request

    result = await probe_app(_inbound(port, tcp=True))  # the default, 127.0.0.1
    assert result == ProbeResult(False, f"tcp 127.0.0.1:{port}: connection refused")


async def test_probes_of_an_ipv6_app_host(nursery: trio.Nursery) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("this host has no IPv6 loopback (::1)")
    reply = b"HTTP/1.1 204 No Content\r\n\r\n"
    port, requests = await _start_app(nursery, reply, "::1")
    result = await probe_app(_inbound(port, "::1", http="/healthz"))
    assert result == ProbeResult(True, f"http [::1]:{port}/healthz: HTTP 204")
    [request] = requests
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in request


async def test_http_probe_that_never_answers_fails_at_the_timeout(nursery: trio.Nursery) -> None:
    port, _ = await _start_app(nursery, None)
    with trio.fail_after(5):
        result = await probe_app(_inbound(port, http="/healthz"))
    assert result == ProbeResult(False, f"http 127.0.0.1:{port}/healthz: no answer within 0.5s")


async def test_http_probe_of_a_non_http_app(nursery: trio.Nursery) -> None:
    port, _ = await _start_app(nursery, b"SSH-2.0-OpenSSH\r\n")
    result = await probe_app(_inbound(port, http="/"))
    assert result == ProbeResult(False, f"http 127.0.0.1:{port}/: not an HTTP/1 response")


async def test_pidfile_probe(tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    result = await probe_app(_inbound(pidfile=str(pidfile)))
    assert result == ProbeResult(True, f"pidfile {pidfile}: process {os.getpid()} running")

    exited = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
    await exited.wait()
    dead_pid = exited.pid  # reaped: its pid names no process now (reuse is very unlikely)
    pidfile.write_text(str(dead_pid))
    result = await probe_app(_inbound(pidfile=str(pidfile)))
    assert result == ProbeResult(False, f"pidfile {pidfile}: process {dead_pid} is not running")

    pidfile.write_text("garbage")
    result = await probe_app(_inbound(pidfile=str(pidfile)))
    assert result == ProbeResult(False, f"pidfile {pidfile}: 'garbage' is not a process id")

    missing = tmp_path / "missing.pid"
    result = await probe_app(_inbound(pidfile=str(missing)))
    assert result == ProbeResult(False, f"pidfile {missing}: no such file")


async def test_command_probe() -> None:
    marker = f"meshagent-probe-test-{uuid.uuid4()}"
    result = await probe_app(_inbound(command=marker))
    assert not result.healthy
    assert result.output == (f"command {marker!r}: no running process has it in its command line")

    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", "import time; time.sleep(60)", marker]
    )
    try:
        result = await probe_app(_inbound(command=marker))
        assert result == ProbeResult(True, f"command {marker!r}: process {process.pid} running")
    finally:
        process.kill()
        await process.wait()


async def test_every_configured_probe_must_pass(nursery: trio.Nursery, tmp_path: Path) -> None:
    port, _ = await _start_app(nursery, b"HTTP/1.0 500 Oops\r\n\r\n")
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(str(os.getpid()))
    result = await probe_app(_inbound(port, tcp=True, http="/", pidfile=str(pidfile)))
    assert result == ProbeResult(False, f"http 127.0.0.1:{port}/: HTTP 500")

    port, _ = await _start_app(nursery, b"HTTP/1.1 200 OK\r\n\r\n")
    result = await probe_app(_inbound(port, tcp=True, http="/", pidfile=str(pidfile)))
    assert result.healthy
    assert result.output == (
        f"tcp 127.0.0.1:{port}: connected; http 127.0.0.1:{port}/: HTTP 200; "
        f"pidfile {pidfile}: process {os.getpid()} running"
    )
