"""An app that fails its health probe leaves the built-in catalog of every caller while
its agent keeps running, and comes back when it recovers: real central and agent
processes on loopback, no Consul.

Two agents serve ``orders`` (127.0.0.3 and 127.0.0.4, each in front of its own echo
app, tcp probe every second), a third (``web``, 127.0.0.2) calls it. ``orders-2``'s
app is stopped; its agent keeps heartbeating, so only the probe can tell.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshagent.agent.central import MIN_REPORT_SECONDS
from meshagent.demo.central import CentralProcess
from meshagent.demo.processes import Process, start_app
from tests.e2e.harness import eventually, free_port
from tests.e2e.test_central_dataplanes_cli import cli
from tests.e2e.test_central_mesh import Mesh, joined_config, round_trip
from tests.e2e.test_central_offline import orders_hosts

PROBE_INTERVAL = 1.0
# A failed probe within one interval (plus the probe's own timeout for a hung app: a
# stopped one refuses at once), a report within MIN_REPORT_SECONDS, then the long
# poll returns at once; the margin covers the agents' and the machine's pace.
HEALTH_BOUND = 2 * PROBE_INTERVAL + MIN_REPORT_SECONDS + 6.0


@pytest.fixture
def central(tmp_path: Path) -> Iterator[CentralProcess]:
    process = CentralProcess(tmp_path, cert_ttl="1h", heartbeat_interval="1s")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_an_unhealthy_app_leaves_the_catalog_and_returns(
    tmp_path: Path, central: CentralProcess
) -> None:
    apps: dict[str, tuple[Process, int]] = {}
    try:
        with central.admin() as admin, Mesh(central, tmp_path) as mesh:
            admin.create_mesh("shop")
            configs: dict[str, dict[str, Any]] = {}
            for name, address in (("orders-1", "127.0.0.3"), ("orders-2", "127.0.0.4")):
                apps[name] = start_app("echo", tmp_path, name=f"echo-{name}")
                configs[name] = joined_config(
                    central, tmp_path, name, address, admin.join_token("shop", ["orders"]),
                    inbound={"service": "orders", "port": free_port(address),
                             "app_port": apps[name][1],
                             "health": {"tcp": True, "interval": f"{PROBE_INTERVAL:g}s",
                                        "timeout": "1s"}},
                )
                mesh.start(configs[name], name)
            configs["web"] = mesh.web_config(admin)
            mesh.start(configs["web"], "web")

            both = ["127.0.0.3", "127.0.0.4"]
            eventually(lambda: orders_hosts(configs["web"]) == both, within=15,
                       what="web's snapshot lists both orders endpoints")
            assert all(round_trip(mesh.web_port) for _ in range(4))

            process, app_port = apps.pop("orders-2")
            process.stop()
            stopped = time.monotonic()
            eventually(lambda: orders_hosts(configs["web"]) == ["127.0.0.3"],
                       within=HEALTH_BOUND,
                       what="web's snapshot drops the endpoint whose app is down")
            print(f"unhealthy endpoint left the caller's snapshot "
                  f"{time.monotonic() - stopped:.2f} s after its app stopped "
                  f"(probe every {PROBE_INTERVAL:g} s, bound {HEALTH_BOUND:g} s)")
            # Every connection now goes to the healthy endpoint.
            assert all(round_trip(mesh.web_port) for _ in range(8))
            views = {d["name"]: d for d in admin.dataplanes("shop")}
            assert views["orders-2"]["unhealthy"] == ["orders"]
            assert views["orders-2"]["online"] and views["orders-1"]["unhealthy"] == []
            table = cli(central, "get", "dataplanes", "--mesh", "shop").stdout
            row = next(line for line in table.splitlines() if line.startswith("orders-2"))
            assert "orders (unhealthy)" in row and "online" in row
            output = central.output()
            assert "services unhealthy: they leave the built-in catalog" in output
            assert "every endpoint of a service is unhealthy" not in output

            # The app is back on its port: the next probe passes, the endpoint returns.
            apps["orders-2"] = start_app(
                "echo", tmp_path, port=app_port, name="echo-orders-2-again"
            )
            restarted = time.monotonic()
            eventually(lambda: orders_hosts(configs["web"]) == both, within=HEALTH_BOUND,
                       what="web's snapshot lists the recovered endpoint again")
            print(f"recovered endpoint back in the caller's snapshot "
                  f"{time.monotonic() - restarted:.2f} s after its app listened again")
            assert [d["unhealthy"] for d in admin.dataplanes("shop")] == [[], [], []]
            assert "services healthy again: they return to the built-in catalog" in (
                central.output()
            )
            assert all(round_trip(mesh.web_port) for _ in range(4))
    finally:
        for process, _ in apps.values():
            process.stop()
