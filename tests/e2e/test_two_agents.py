"""Two legacy processes on two "hosts" talk through two agent processes over mTLS,
found through a real Consul. Everything real: processes, sockets, TLS, Consul."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from meshagent.demo.consul import ConsulProcess
from tests.e2e.harness import (
    agent_config,
    consul_get,
    eventually,
    exchange,
    free_port,
    running,
    start_agent,
    start_app,
)
from tests.support.pki import MeshCa, make_ca


@pytest.fixture
def ca(tmp_path: Path) -> MeshCa:
    return make_ca(tmp_path / "ca", "shop")


def orders_host(
    tmp_path: Path, ca: MeshCa, consul: ConsulProcess, address: str, app_port: int
) -> tuple[dict[str, object], int]:
    port = free_port(address)
    config = agent_config(
        f"orders-{address}", address, ca, "orders", consul=consul,
        inbound={"port": port, "app_port": app_port, "tags": {"version": "v1"}},
    )
    return config, port


def web_host(tmp_path: Path, ca: MeshCa, consul: ConsulProcess) -> tuple[dict[str, object], int]:
    port = free_port()
    config = agent_config(
        "web", "127.0.0.2", ca, "web", consul=consul,
        outbound=[{"service": "orders", "port": port}],
    )
    return config, port


def healthy_instances(consul: ConsulProcess) -> list[str]:
    entries = consul_get(consul, "/v1/health/service/orders?passing=1")
    return sorted(f"{e['Service']['Address']}:{e['Service']['Port']}" for e in entries)


def test_stream_round_trips_with_half_close(tmp_path: Path, ca: MeshCa, consul: ConsulProcess) -> None:
    echo, echo_port = start_app("echo", tmp_path, name="echo")
    with running(echo):
        orders_cfg, inbound_port = orders_host(tmp_path, ca, consul, "127.0.0.3", echo_port)
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web_cfg, outbound_port = web_host(tmp_path, ca, consul)
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            eventually(lambda: exchange(outbound_port, b"ping") == b"ping", within=10,
                       what="web sees the orders endpoint")
            payload = bytes(range(256)) * 4096  # 1 MiB
            assert exchange(outbound_port, payload) == payload
            # Registration carries what other agents and operators need.
            entry = consul_get(consul, "/v1/health/service/orders")[0]["Service"]
            assert entry["Address"] == "127.0.0.3" and entry["Port"] == inbound_port
            assert entry["Meta"]["mesh"] == "shop" and entry["Meta"]["version"] == "v1"
            assert "version=v1" in entry["Tags"]
        assert web.proc.returncode == 0 and orders.proc.returncode == 0
        # SIGTERM deregistered the inbound.
        assert consul_get(consul, "/v1/health/service/orders") == []

    # Half-close: the app answers only after it saw our FIN, through both agents.
    reply, reply_port = start_app("reply", tmp_path, name="orders-a")
    with running(reply):
        orders_cfg, _ = orders_host(tmp_path, ca, consul, "127.0.0.3", reply_port)
        web_cfg, outbound_port = web_host(tmp_path, ca, consul)
        orders = start_agent(orders_cfg, tmp_path, "orders2")
        web = start_agent(web_cfg, tmp_path, "web2")
        with running(orders, web):
            eventually(lambda: exchange(outbound_port, b"x" * 1000) == b"orders-a got 1000",
                       within=10, what="half-closed request answered")


def test_an_app_on_the_hosts_own_address_only_is_probed_and_reached_there(
    tmp_path: Path, ca: MeshCa, consul: ConsulProcess
) -> None:
    """A legacy app bound to its host's address, not loopback (``app_host``): the
    inbound's TCP probe passes there, so Consul lists it, and traffic reaches it."""
    echo, echo_port = start_app("echo", tmp_path, name="echo", host="127.0.0.3")
    with running(echo):
        orders_cfg, inbound_port = orders_host(tmp_path, ca, consul, "127.0.0.3", echo_port)
        orders_cfg["inbound"][0]["app_host"] = "127.0.0.3"  # type: ignore[index]
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web_cfg, outbound_port = web_host(tmp_path, ca, consul)
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            eventually(lambda: healthy_instances(consul) == [f"127.0.0.3:{inbound_port}"],
                       within=10, what="the app_host probe passes in Consul")
            check = consul_get(consul, "/v1/health/service/orders")[0]["Checks"]
            assert any(f"tcp 127.0.0.3:{echo_port}: connected" in c["Output"] for c in check)
            eventually(lambda: exchange(outbound_port, b"ping") == b"ping", within=10,
                       what="web reaches the app on 127.0.0.3")


def test_64_mib_through_the_pair_with_bounded_agent_memory(
    tmp_path: Path, ca: MeshCa, consul: ConsulProcess
) -> None:
    echo, echo_port = start_app("echo", tmp_path, name="echo")
    orders_cfg, _ = orders_host(tmp_path, ca, consul, "127.0.0.3", echo_port)
    web_cfg, outbound_port = web_host(tmp_path, ca, consul)
    with running(echo):
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            eventually(lambda: exchange(outbound_port, b"ping") == b"ping", within=10,
                       what="web sees the orders endpoint")
            before = {a: a.rss() for a in (orders, web)}
            peak = dict(before)
            total = 64 * 1024 * 1024
            chunk = bytes(range(256)) * 256  # 64 KiB
            received = 0
            with socket.create_connection(("127.0.0.1", outbound_port), timeout=30) as sock:

                def write() -> None:
                    for _ in range(total // len(chunk)):
                        sock.sendall(chunk)
                    sock.shutdown(socket.SHUT_WR)

                writer = threading.Thread(target=write, daemon=True)
                writer.start()
                # A slow reader first: nothing is read for a while, so everything
                # between the writer and us must fill up and then push back.
                stall_end = time.monotonic() + 2
                while time.monotonic() < stall_end:
                    for agent in (orders, web):
                        peak[agent] = max(peak[agent], agent.rss())
                    time.sleep(0.1)
                pattern = bytes(range(256)) * ((1 << 20) // 256 + 1)
                while data := sock.recv(1 << 20):
                    offset = received % 256
                    assert data == pattern[offset : offset + len(data)], f"corrupt at {received}"
                    received += len(data)
                    if received % (8 << 20) < len(data):
                        for agent in (orders, web):
                            peak[agent] = max(peak[agent], agent.rss())
                writer.join(10)
            assert received == total
            for agent in (orders, web):
                growth = peak[agent] - before[agent]
                assert growth < 32 << 20, f"{agent.name} grew {growth >> 20} MiB for a 64 MiB stream"


def test_stopped_app_leaves_the_choice_and_consul_outages_keep_traffic(
    tmp_path: Path, ca: MeshCa, consul: ConsulProcess
) -> None:
    app_a, port_a = start_app("reply", tmp_path, name="a")
    app_b, port_b = start_app("reply", tmp_path, name="b")
    with running(app_a, app_b):
        cfg_a, _ = orders_host(tmp_path, ca, consul, "127.0.0.3", port_a)
        cfg_b, _ = orders_host(tmp_path, ca, consul, "127.0.0.4", port_b)
        web_cfg, outbound_port = web_host(tmp_path, ca, consul)
        agents = [start_agent(cfg, tmp_path, n) for cfg, n in ((cfg_a, "a"), (cfg_b, "b"))]
        agents.append(start_agent(web_cfg, tmp_path, "web"))
        with running(*agents):

            def answers(n: int) -> set[bytes]:
                return {exchange(outbound_port, b"hi").split(b" ")[0] for _ in range(n)}

            eventually(lambda: answers(6) == {b"a", b"b"}, within=15,
                       what="round-robin reaches both instances")

            app_b.stop()  # the app on host .4 dies; its agent keeps running
            eventually(lambda: len(healthy_instances(consul)) == 1, within=10,
                       what="the check of the stopped app turns critical")
            checks = consul_get(consul, "/v1/health/checks/orders")
            assert {c["Status"] for c in checks} == {"passing", "critical"}
            eventually(lambda: answers(6) == {b"a"}, within=10,
                       what="the web agent stops choosing the dead endpoint")

            consul.stop()  # the catalog goes away: the last good endpoints keep serving
            assert answers(20) == {b"a"}

            consul.start()  # dev mode: it comes back empty, so the agents re-register
            eventually(lambda: healthy_instances(consul) == ["127.0.0.3:" + str(cfg_a["inbound"][0]["port"])],  # type: ignore[index]
                       within=20, what="the registration comes back after a Consul restart")
            eventually(lambda: answers(6) == {b"a"}, within=10,
                       what="traffic flows after the Consul restart")
            web_log = agents[2].output()
            assert "no healthy endpoint" not in web_log, "the resync grace should hold endpoints"


def test_garbage_on_the_inbound_port_is_dropped(tmp_path: Path, ca: MeshCa, consul: ConsulProcess) -> None:
    echo, echo_port = start_app("echo", tmp_path, name="echo")
    orders_cfg, inbound_port = orders_host(tmp_path, ca, consul, "127.0.0.3", echo_port)
    web_cfg, outbound_port = web_host(tmp_path, ca, consul)
    with running(echo):
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)), b"\x16\x03\x01\x00\x05hello"):
                with socket.create_connection(("127.0.0.3", inbound_port), timeout=5) as sock:
                    sock.sendall(junk)
                    with contextlib.suppress(ConnectionResetError):
                        # Dropped, after at most a TLS alert record (content type 21).
                        answer = sock.recv(100)
                        assert answer == b"" or answer.startswith(b"\x15\x03")
                        assert sock.recv(100) == b""
            eventually(lambda: exchange(outbound_port, b"fine") == b"fine", within=10,
                       what="traffic still flows")
            orders.proc.send_signal(signal.SIGTERM)
            assert orders.proc.wait(10) == 0
        assert "error=\"handshake:" in orders.output()
        # Test certificates live one hour: the agent says so, with the fix.
        assert 'event="certificate expires soon"' in orders.output()


def test_sigterm_deregisters_stops_accepting_and_drains(
    tmp_path: Path, ca: MeshCa, consul: ConsulProcess
) -> None:
    echo, echo_port = start_app("echo", tmp_path, name="echo")
    orders_cfg, inbound_port = orders_host(tmp_path, ca, consul, "127.0.0.3", echo_port)
    orders_cfg["limits"] = {"drain_timeout": "20s"}
    web_cfg, outbound_port = web_host(tmp_path, ca, consul)
    with running(echo):
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            eventually(lambda: exchange(outbound_port, b"ping") == b"ping", within=10,
                       what="web sees orders")
            with socket.create_connection(("127.0.0.1", outbound_port), timeout=10) as sock:
                sock.sendall(b"before")
                assert sock.recv(100) == b"before"
                orders.proc.send_signal(signal.SIGTERM)
                orders.wait_for("STOPPING=1")
                eventually(lambda: consul_get(consul, "/v1/health/service/orders") == [],
                           within=5, what="deregistered first")
                eventually(lambda: not _accepts("127.0.0.3", inbound_port), within=5,
                           what="the inbound stops accepting")
                # The connection that was open keeps working while the agent drains.
                sock.sendall(b"during")
                assert sock.recv(100) == b"during"
                assert orders.proc.poll() is None
                sock.shutdown(socket.SHUT_WR)
                assert sock.recv(100) == b""
            assert orders.proc.wait(10) == 0
        assert 'event=drained' in orders.output()


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True
