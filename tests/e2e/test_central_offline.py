"""A dataplane that goes silent leaves the built-in catalog of every caller, and comes
back with its first heartbeat: real central and agent processes on loopback, no Consul.

Two agents serve ``orders`` (127.0.0.3 and 127.0.0.4), a third (``web``, 127.0.0.2)
calls it. The central agent runs with ``heartbeat_interval = "1s"``: a dataplane is
offline after 3 s of silence and the leader sweeps every 0.5 s (and only after it has
watched for 3 s since it started). ``orders-2`` is killed with SIGKILL (no clean stop,
no last word), so only the missing heartbeats tell.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshagent.demo.central import CentralProcess
from meshagent.demo.processes import Agent
from tests.e2e.harness import eventually, free_port
from tests.e2e.test_central_mesh import Mesh, joined_config, round_trip

HEARTBEAT = 1.0
# Offline after three heartbeats, noticed within a sweep (half a heartbeat), then the
# long poll returns at once; the margin covers the agents' and the machine's pace.
OFFLINE_BOUND = 3 * HEARTBEAT + HEARTBEAT / 2 + 6.0


@pytest.fixture
def central(tmp_path: Path) -> Iterator[CentralProcess]:
    process = CentralProcess(tmp_path, cert_ttl="1h", heartbeat_interval="1s")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def snapshot_of(config: dict[str, Any]) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{config['admin']}/snapshot", timeout=5) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def orders_hosts(config: dict[str, Any]) -> list[str]:
    endpoints = snapshot_of(config).get("endpoints", {}).get("orders", [])
    return sorted(e["host"] for e in endpoints)


def test_a_killed_dataplane_leaves_the_catalog_and_returns(
    tmp_path: Path, central: CentralProcess
) -> None:
    with central.admin() as admin, Mesh(central, tmp_path) as mesh:
        admin.create_mesh("shop")
        configs: dict[str, dict[str, Any]] = {}
        agents: dict[str, Agent] = {}
        for name, address in (("orders-1", "127.0.0.3"), ("orders-2", "127.0.0.4")):
            echo_port = mesh.start_echo()
            configs[name] = joined_config(
                central, tmp_path, name, address, admin.join_token("shop", ["orders"]),
                inbound={"service": "orders", "port": free_port(address), "app_port": echo_port,
                         "health": {"tcp": True, "interval": "1s"}},
            )
            agents[name] = mesh.start(configs[name], name)
        configs["web"] = mesh.web_config(admin)
        mesh.start(configs["web"], "web")

        both = ["127.0.0.3", "127.0.0.4"]
        eventually(lambda: orders_hosts(configs["web"]) == both, within=15,
                   what="web's snapshot lists both orders endpoints")
        assert all(round_trip(mesh.web_port) for _ in range(4))

        agents["orders-2"].stop(9)  # SIGKILL
        killed = time.monotonic()
        eventually(lambda: orders_hosts(configs["web"]) == ["127.0.0.3"], within=OFFLINE_BOUND,
                   what="web's snapshot drops the killed dataplane's endpoint")
        took = time.monotonic() - killed
        print(f"offline dataplane left the catalog {took:.2f} s after SIGKILL "
              f"(heartbeat {HEARTBEAT:g} s, bound {OFFLINE_BOUND:g} s)")
        # Every connection now goes to the live endpoint: none is tried on the dead one.
        assert all(round_trip(mesh.web_port) for _ in range(6))
        views = {d["name"]: d for d in admin.dataplanes("shop")}
        assert (views["orders-2"]["online"], views["orders-2"]["in_catalog"]) == (False, False)
        assert views["orders-1"]["in_catalog"] and views["web-shop"]["in_catalog"]
        assert "dataplanes offline: their endpoints left the built-in catalog" in central.output()

        # Back (from its saved membership): its first heartbeat returns it to the catalog.
        restarted = time.monotonic()
        mesh.start(configs["orders-2"], "orders-2-again")
        eventually(lambda: orders_hosts(configs["web"]) == both, within=15,
                   what="web's snapshot lists the restarted dataplane again")
        print(f"restarted dataplane back in the catalog {time.monotonic() - restarted:.2f} s "
              "after its start began")
        views = {d["name"]: d for d in admin.dataplanes("shop")}
        assert views["orders-2"]["online"] and views["orders-2"]["in_catalog"]
        assert "dataplane back online" in central.output()
