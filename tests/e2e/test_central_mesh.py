"""Agents that join a central agent: real central and agent processes on loopback, real
TLS, no Consul (the central agent's inventory is the catalog), echo apps.

What the central-agent issue promises, end to end: joining with a token, traffic
between joined agents, a live permissive -> strict switch, outages of the central agent
(traffic continues; an agent restarted during the outage serves from its saved state),
renewal under traffic without dropping a connection, and tenants that cannot reach or
join each other."""

from __future__ import annotations

import socket
import stat
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshagent.demo.central import AdminClient, CentralProcess
from meshagent.demo.processes import Agent, Process
from tests.e2e.harness import eventually, exchange, free_port, start_agent, start_app


@pytest.fixture
def central(tmp_path: Path) -> Iterator[CentralProcess]:
    process = CentralProcess(tmp_path, cert_ttl="1h")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def joined_config(
    central: CentralProcess,
    tmp: Path,
    name: str,
    address: str,
    token: str,
    *,
    mesh: str = "shop",
    inbound: dict[str, Any] | None = None,
    outbound: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    token_file = tmp / f"{name}.join-token"
    token_file.write_text(token + "\n")
    config: dict[str, Any] = {
        "mesh": mesh,
        "node": name,
        "address": address,
        "state_dir": str(tmp / f"{name}-state"),
        "admin": f"127.0.0.1:{free_port()}",
        "central": {
            "url": central.url,
            "ca": str(central.ca),
            "token_file": str(token_file),
            "join_timeout": "10s",
        },
        "limits": {"drain_timeout": "3s", "connect_timeout": "2s"},
        "log": {"level": "debug"},
    }
    if inbound is not None:
        config["inbound"] = [inbound]
    if outbound is not None:
        config["outbound"] = outbound
    return config


class Mesh:
    """An echo service ``orders`` on 127.0.0.3 and a caller ``web`` on 127.0.0.2."""

    def __init__(self, central: CentralProcess, tmp: Path, mesh: str = "shop") -> None:
        self.central, self.tmp, self.mesh = central, tmp, mesh
        self.processes: list[Process] = []
        self.orders_port = free_port("127.0.0.3")
        self.web_port = free_port()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            process.stop()

    def start_echo(self) -> int:
        echo, port = start_app("echo", self.tmp, name=f"echo-{self.mesh}")
        self.processes.append(echo)
        return port

    def orders_config(self, admin: AdminClient, app_port: int) -> dict[str, Any]:
        return joined_config(
            self.central, self.tmp, f"orders-{self.mesh}", "127.0.0.3",
            admin.join_token(self.mesh, ["orders"]), mesh=self.mesh,
            inbound={"service": "orders", "port": self.orders_port, "app_port": app_port,
                     "health": {"tcp": True, "interval": "1s"}},
        )

    def web_config(self, admin: AdminClient) -> dict[str, Any]:
        return joined_config(
            self.central, self.tmp, f"web-{self.mesh}", "127.0.0.2",
            admin.join_token(self.mesh, ["web"]), mesh=self.mesh,
            outbound=[{"service": "orders", "port": self.web_port, "source": "web"}],
        )

    def start(self, config: dict[str, Any], name: str) -> Agent:
        agent = start_agent(config, self.tmp, name)
        self.processes.append(agent)
        return agent


def round_trip(port: int, payload: bytes = b"hello") -> bool:
    try:
        return exchange(port, payload, timeout=3) == payload
    except OSError:
        return False


def test_joined_agents_talk_and_survive_a_central_outage(
    tmp_path: Path, central: CentralProcess
) -> None:
    with central.admin() as admin, Mesh(central, tmp_path) as mesh:
        admin.create_mesh("shop", mtls="strict")
        echo_port = mesh.start_echo()
        orders_config = mesh.orders_config(admin, echo_port)
        mesh.start(orders_config, "orders")
        web_config = mesh.web_config(admin)
        web = mesh.start(web_config, "web")
        eventually(lambda: round_trip(mesh.web_port), within=10, what="web -> orders")

        state = Path(web_config["state_dir"]) / "central"
        for name in ("node.token", "web.pem", "config.json", "joined.json"):
            assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
        assert "ma1_" not in web.output()  # no secret in the log

        def all_applied() -> bool:
            dataplanes = admin.dataplanes("shop")
            return len(dataplanes) == 2 and all(
                d["online"] and d["applied_version"] == d["latest_version"] for d in dataplanes
            )

        eventually(all_applied, within=15, what="both dataplanes online and up to date")

        central.stop()
        assert round_trip(mesh.web_port), "traffic stops when the central agent stops"
        web.stop()
        web = mesh.start(web_config, "web-again")  # READY with the central agent down
        assert round_trip(mesh.web_port), "an agent restarted during the outage does not serve"
        assert "using saved membership" in web.output()

        central.start()
        eventually(all_applied, within=20, what="agents report again once it is back")


def test_a_moved_inbound_reaches_callers_without_a_new_token(
    tmp_path: Path, central: CentralProcess
) -> None:
    with central.admin() as admin, Mesh(central, tmp_path) as mesh:
        admin.create_mesh("shop")
        echo_port = mesh.start_echo()
        orders_config = mesh.orders_config(admin, echo_port)
        orders = mesh.start(orders_config, "orders")
        mesh.start(mesh.web_config(admin), "web")
        eventually(lambda: round_trip(mesh.web_port), within=10, what="web -> orders")
        orders.stop()
        # Same services, another port: the (used) join token is not needed again.
        orders_config["inbound"][0]["port"] = free_port("127.0.0.3")
        moved = mesh.start(orders_config, "orders-moved")
        eventually(lambda: round_trip(mesh.web_port), within=15, what="web finds the new port")
        assert "listeners updated at the central agent" in moved.output()


def test_permissive_to_strict_switch_reaches_a_live_agent(
    tmp_path: Path, central: CentralProcess
) -> None:
    with central.admin() as admin, Mesh(central, tmp_path) as mesh:
        admin.create_mesh("shop", mtls="permissive")
        echo_port = mesh.start_echo()
        mesh.start(mesh.orders_config(admin, echo_port), "orders")
        mesh.start(mesh.web_config(admin), "web")
        eventually(lambda: round_trip(mesh.web_port), within=10, what="web -> orders")

        def plaintext_ok() -> bool:  # a legacy caller straight to the inbound
            try:
                with socket.create_connection(("127.0.0.3", mesh.orders_port), timeout=3) as s:
                    s.sendall(b"plain")
                    s.shutdown(socket.SHUT_WR)
                    return s.recv(100) == b"plain"
            except OSError:
                return False

        assert plaintext_ok()
        admin.set_mesh("shop", mtls="strict")
        eventually(lambda: not plaintext_ok(), within=15, what="plaintext refused once strict")
        assert round_trip(mesh.web_port), "mTLS traffic still flows after the switch"


def test_renewal_under_traffic_drops_no_connection(tmp_path: Path) -> None:
    central = CentralProcess(tmp_path, cert_ttl="6s")  # renewed every 4 s
    central.start()
    try:
        with central.admin() as admin, Mesh(central, tmp_path) as mesh:
            admin.create_mesh("shop")
            echo_port = mesh.start_echo()
            orders = mesh.start(mesh.orders_config(admin, echo_port), "orders")
            web = mesh.start(mesh.web_config(admin), "web")
            eventually(lambda: round_trip(mesh.web_port), within=10, what="web -> orders")
            with socket.create_connection(("127.0.0.1", mesh.web_port), timeout=5) as held:
                deadline = time.monotonic() + 10  # two renewals or more on both sides
                n = 0
                while time.monotonic() < deadline:
                    payload = f"ping {n}\n".encode()
                    held.sendall(payload)
                    assert held.recv(100) == payload, "the held connection broke"
                    assert round_trip(mesh.web_port), "a new connection failed"
                    n += 1
                    time.sleep(0.2)
            for agent in (orders, web):
                assert agent.output().count("certificates renewed") >= 2, agent.output()
    finally:
        central.stop()


def test_tenants_cannot_join_or_reach_each_other(
    tmp_path: Path, central: CentralProcess
) -> None:
    with central.admin() as admin, Mesh(central, tmp_path) as mesh:
        admin.create_mesh("shop")
        admin.create_mesh("billing")
        echo_port = mesh.start_echo()
        mesh.start(mesh.orders_config(admin, echo_port), "orders")

        # A shop token does not let an agent into billing: it stops with one line.
        config = joined_config(
            central, tmp_path, "intruder", "127.0.0.4", admin.join_token("shop", ["web"]),
            mesh="billing",
            outbound=[{"service": "orders", "port": free_port(), "source": "web"}],
        )
        intruder = Agent(config, tmp_path, "intruder")
        mesh.processes.append(intruder)
        assert intruder.proc.wait(20) == 1
        errors = [line for line in intruder.output().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "join refused" in errors[0], intruder.output()

        # A billing agent pointed straight at shop's inbound is refused by mTLS.
        billing_port = free_port()
        config = joined_config(
            central, tmp_path, "billing-web", "127.0.0.4", admin.join_token("billing", ["web"]),
            mesh="billing",
            outbound=[{
                "service": "orders", "port": billing_port, "source": "web",
                "endpoints": [f"127.0.0.3:{mesh.orders_port}"],
            }],
        )
        mesh.start(config, "billing-web")
        assert not round_trip(billing_port)
        assert [d["name"] for d in admin.dataplanes("billing")] == ["billing-web"]


STRANGLER = """
[[TrafficRoute]]
name = "orders-migration"
mesh = "shop"
destination = "monolith"
  [[TrafficRoute.rule]]
  match = { path_prefix = "/orders" }
  split = [ { service = "orders", tags = { version = "v1" }, weight = %d },
            { service = "orders", tags = { version = "v2" }, weight = %d } ]
  [TrafficRoute.default]
  split = [ { service = "monolith", weight = 100 } ]

[[TrafficPermission]]
name = "web-calls"
mesh = "shop"
sources = ["web"]
destination = "orders"
"""


def test_routes_from_the_central_agent_move_a_canary_without_restarts(
    tmp_path: Path, central: CentralProcess
) -> None:
    hosts = [("monolith", "127.0.0.3", "monolith", "v1"), ("orders-v1", "127.0.0.4", "orders", "v1"),
             ("orders-v2", "127.0.0.5", "orders", "v2")]
    with central.admin() as admin, Mesh(central, tmp_path) as mesh:
        admin.create_mesh("shop", default_allow=False)
        admin.apply("shop", STRANGLER % (100, 0))
        for name, address, service, version in hosts:
            app, app_port = start_app("http", tmp_path, name=name)
            mesh.processes.append(app)
            config = joined_config(
                central, tmp_path, name, address, admin.join_token("shop", [service]),
                inbound={"service": service, "port": free_port(address), "app_port": app_port,
                         "protocol": "http", "tags": {"version": version}},
            )
            mesh.start(config, name)
        web_port = free_port()
        config = joined_config(
            central, tmp_path, "web", "127.0.0.2", admin.join_token("shop", ["web"]),
            outbound=[{"service": "monolith", "port": web_port, "protocol": "http",
                       "source": "web"}],
        )
        mesh.start(config, "web")
        with httpx.Client(base_url=f"http://127.0.0.1:{web_port}", timeout=10,
                          trust_env=False) as http:

            def apps_for(path: str, n: int) -> Counter[str]:
                answers = [http.get(path) for _ in range(n)]
                return Counter(r.json()["app"] if r.status_code == 200 else str(r.status_code)
                               for r in answers)

            eventually(lambda: apps_for("/orders/1", 5) == Counter({"orders-v1": 5}),
                       within=15, what="/orders goes to orders v1")
            # default_allow = false and no permission names monolith: the mesh denies it,
            # and says why.
            denied = http.get("/users/7")
            assert denied.status_code == 403 and "no TrafficPermission" in denied.text
            admin.apply("shop", STRANGLER % (0, 100) + """
[[TrafficPermission]]
name = "web-calls-monolith"
mesh = "shop"
sources = ["web"]
destination = "monolith"
""")
            eventually(lambda: apps_for("/orders/1", 5) == Counter({"orders-v2": 5}),
                       within=15, what="the canary moved to v2 without a restart")
            eventually(lambda: apps_for("/users/7", 3) == Counter({"monolith": 3}),
                       within=15, what="the new permission lets web call the monolith")
