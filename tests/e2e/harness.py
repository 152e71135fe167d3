"""A small mesh of real processes on loopback: agents on 127.0.0.x "hosts", stand-in
apps, a real Consul. Blocking helpers (these tests drive processes, not trio tasks)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from meshagent.demo.consul import ConsulProcess
from meshagent.demo.ports import free_port
from meshagent.demo.processes import Agent, Process, start_app
from tests.support.pki import MeshCa

MESH = "shop"


def agent_config(
    name: str,
    address: str,
    ca: MeshCa,
    service: str,
    *,
    consul: ConsulProcess | None,
    inbound: dict[str, Any] | None = None,
    outbound: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    files = ca.issue(service)
    config: dict[str, Any] = {
        "mesh": MESH,
        "node": name,
        "address": address,
        "tls": {"ca": files.ca, "cert": files.cert, "key": files.key},
        "limits": {"drain_timeout": "5s", "connect_timeout": "2s"},
        "log": {"level": "debug"},
        "admin": f"127.0.0.1:{free_port()}",
    }
    if consul is not None:
        config["consul"] = {"address": consul.address, "watch_wait": "5s"}
    if inbound is not None:
        config["inbound"] = [
            {"service": service, "health": {"tcp": True, "interval": "1s"}, **inbound}
        ]
    if outbound is not None:
        config["outbound"] = [{"source": service, **o} for o in outbound]
    return config


@contextmanager
def running(*processes: Process) -> Iterator[None]:
    try:
        yield
    finally:
        for process in reversed(processes):
            process.stop()


def start_agent(config: dict[str, Any], tmp: Path, name: str) -> Agent:
    agent = Agent(config, tmp, name)
    try:
        agent.wait_for("READY=1")
    except BaseException:
        agent.stop()
        raise
    return agent


def exchange(port: int, payload: bytes, *, timeout: float = 10) -> bytes:
    """Send, half-close, read to EOF (b"" if the connection is reset)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        except ConnectionResetError:
            return b""
        return b"".join(chunks)


def consul_get(consul: ConsulProcess, path: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(consul.address + path, timeout=5) as response:
        return json.loads(response.read())


def eventually(predicate: Callable[[], bool], *, within: float, what: str) -> None:
    """Poll ``predicate`` (bounded); fail with ``what`` if it never holds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {within:g} s: {what}")


__all__ = ["free_port", "start_app"]
