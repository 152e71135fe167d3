"""Worker processes: one agent serves its listeners from several processes (SO_REUSEPORT),
fed the same snapshot; a dead worker is restarted and the others keep their connections."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from meshagent.demo.processes import Agent
from tests.e2e.harness import (
    agent_config,
    eventually,
    exchange,
    free_port,
    running,
    start_agent,
    start_app,
)
from tests.e2e.test_policies import ROUTE
from tests.support.pki import MeshCa, make_ca


def stats(config: dict[str, Any]) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{config['admin']}/stats", timeout=5) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def metrics(config: dict[str, Any]) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{config['admin']}/metrics", timeout=5) as response:
        return str(response.read().decode())


def accepted(config: dict[str, Any], prefix: str) -> int:
    return sum(c["accepted"] for name, c in stats(config).items() if name.startswith(prefix))


def workers_of(agent: Agent) -> list[psutil.Process]:
    return [p for p in psutil.Process(agent.proc.pid).children() if "meshagent.agent.worker" in p.cmdline()]


def holders(agent: Agent, port: int) -> Counter[int]:
    """Established connections on ``port`` per process of the agent (pid -> count)."""
    counts: Counter[int] = Counter()
    for proc in [psutil.Process(agent.proc.pid), *workers_of(agent)]:
        for conn in proc.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port:
                counts[proc.pid] += 1
    return counts


@contextmanager
def held(port: int, n: int) -> Iterator[list[socket.socket]]:
    """``n`` connections to ``port``, each proven to echo once, closed at the end."""
    with ExitStack() as stack:
        socks = []
        for k in range(n):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
            echo(sock, f"hello {k}".encode())
            socks.append(sock)
        yield socks


def echo(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        got += chunk
    assert got == payload


def pair(tmp_path: Path, ca: MeshCa, echo_port: int, workers: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    inbound_port = free_port("127.0.0.3")
    orders = agent_config("orders", "127.0.0.3", ca, "orders", consul=None,
                          inbound={"port": inbound_port, "app_port": echo_port})
    outbound_port = free_port()
    web = agent_config("web", "127.0.0.2", ca, "web", consul=None,
                       outbound=[{"service": "orders", "port": outbound_port,
                                  "endpoints": [f"127.0.0.3:{inbound_port}"]}])
    orders["workers"] = workers
    web["workers"] = workers
    return orders, web, outbound_port


@dataclass
class EchoPair:
    orders: Agent
    orders_cfg: dict[str, Any]
    web: Agent
    web_cfg: dict[str, Any]
    port: int  # web's outbound to orders


@contextmanager
def echo_pair(tmp_path: Path, workers: int) -> Iterator[EchoPair]:
    """An echo app behind an orders agent, and a web agent whose outbound reaches it,
    each agent with ``workers`` processes; all stopped at the end."""
    ca = make_ca(tmp_path / "ca", "shop")
    app, echo_port = start_app("echo", tmp_path, name="echo")
    with running(app):
        orders_cfg, web_cfg, port = pair(tmp_path, ca, echo_port, workers=workers)
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            yield EchoPair(orders, orders_cfg, web, web_cfg, port)


def test_workers_share_listeners_and_survive_a_dead_one(tmp_path: Path) -> None:
    with echo_pair(tmp_path, workers=3) as agents:
        orders, web, web_cfg, port = agents.orders, agents.web, agents.web_cfg, agents.port
        assert len(workers_of(web)) == 2 and len(workers_of(orders)) == 2
        with held(port, 24) as socks:
            spread = holders(web, port)
            assert sum(spread.values()) == 24
            assert len(spread) >= 2, f"every connection on one process: {spread}"
            assert accepted(web_cfg, "outbound") == 24  # summed over the processes

            # kill -9 a worker that holds connections: only its own break.
            victim = next(p for p in workers_of(web) if spread[p.pid])
            victim.kill()
            victim.wait(5)
            alive = 0
            for k, sock in enumerate(socks):
                try:
                    echo(sock, f"again {k}".encode())
                    alive += 1
                except (OSError, AssertionError):
                    pass
            assert alive == 24 - spread[victim.pid]

        eventually(lambda: len(workers_of(web)) == 2 and victim.pid not in
                   [p.pid for p in workers_of(web)], within=15, what="the worker restarted")
        for k in range(10):
            assert exchange(port, f"new {k}".encode()) == f"new {k}".encode()
        # The dead worker's last counters stay in the totals: they never go backwards.
        assert accepted(web_cfg, "outbound") >= 34
        eventually(lambda: 'meshagent_processes{mesh="shop"} 3.0' in metrics(web_cfg),
                   within=10, what="the new worker serves")
        assert 'meshagent_worker_restarts_total{mesh="shop"} 1.0' in metrics(web_cfg)
        pids = [p.pid for p in workers_of(web)]
    assert web.proc.returncode == 0 and orders.proc.returncode == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "worker exited; restarting it" in web.output()
    assert "worker exited" not in orders.output()  # nobody killed those


def test_workers_follow_reloaded_policies(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.toml").write_text(ROUTE.format(v1=100, v2=0))
    apps = {v: start_app("reply", tmp_path, name=v) for v in ("v1", "v2")}
    with running(*(a for a, _ in apps.values())):
        endpoints, agents = [], []
        for version, address in (("v1", "127.0.0.3"), ("v2", "127.0.0.4")):
            inbound = free_port(address)
            config = agent_config(f"orders-{version}", address, ca, "orders", consul=None,
                                  inbound={"port": inbound, "app_port": apps[version][1]})
            config["workers"] = 1
            agents.append(start_agent(config, tmp_path, f"orders-{version}"))
            endpoints.append({"address": f"{address}:{inbound}", "service": "orders",
                              "tags": {"version": version}})
        port = free_port()
        web_cfg = agent_config("web", "127.0.0.2", ca, "web", consul=None,
                               outbound=[{"service": "monolith", "port": port,
                                          "endpoints": endpoints}])
        web_cfg["policies"] = str(policies)
        web_cfg["workers"] = 3
        web = start_agent(web_cfg, tmp_path, "web")
        agents.append(web)
        with running(*agents):

            def answers(n: int) -> Counter[bytes]:
                return Counter(exchange(port, b"hi").split(b" ")[0] for _ in range(n))

            assert answers(30) == Counter({b"v1": 30})
            (policies / "routes.toml").write_text(ROUTE.format(v1=0, v2=100))
            os.kill(web.proc.pid, signal.SIGHUP)
            eventually(lambda: "policies reloaded" in web.output(), within=10,
                       what="the agent reloaded its policies")
            # Every process serves the new route (30 connections land on all three).
            eventually(lambda: answers(30) == Counter({b"v2": 30}), within=5,
                       what="every worker took the new snapshot")


def test_a_killed_agent_takes_its_workers_with_it(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    app, echo_port = start_app("echo", tmp_path, name="echo")
    with running(app):
        _, web_cfg, port = pair(tmp_path, ca, echo_port, workers=3)
        web = start_agent(web_cfg, tmp_path, "web")
        with running(web):
            pids = [p.pid for p in workers_of(web)]
            assert len(pids) == 2
            web.proc.kill()
            web.proc.wait(5)

            def gone() -> bool:
                return not any(psutil.pid_exists(p) and psutil.Process(p).status()
                               != psutil.STATUS_ZOMBIE for p in pids)

            eventually(gone, within=5, what="the workers died with the agent")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # nobody listens on the port any more
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except ConnectionRefusedError:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("a worker still accepts after its agent was killed")


def handshakes(config: dict[str, Any]) -> dict[str, float]:
    """Inbound TLS handshakes of an agent (all its processes) by resumed yes/no."""
    found = {"yes": 0.0, "no": 0.0}
    for line in metrics(config).splitlines():
        if line.startswith("meshagent_tls_handshakes_total{"):
            resumed = line.split('resumed="', 1)[1].split('"', 1)[0]
            found[resumed] += float(line.rsplit(" ", 1)[1])
    return found


def test_tls_sessions_resume_in_every_worker(tmp_path: Path) -> None:
    """The agent's processes share their TLS ticket keys: a session a client got from
    one worker resumes in the others."""
    with echo_pair(tmp_path, workers=3) as agents, held(agents.port, 30):  # 30 at once
        eventually(lambda: sum(handshakes(agents.orders_cfg).values()) == 30, within=10,
                   what="the handshake counts of every process")
        counts = handshakes(agents.orders_cfg)
        # Each of web's 3 processes makes one full handshake to learn a session; with
        # a ticket key per process about 2 in 3 of the rest would be full too.
        assert counts["no"] <= 6, counts
