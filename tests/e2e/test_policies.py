"""An agent without a central agent: routes from a policy directory, reloaded on SIGHUP.
TCP outbounds split connections by weight across service subsets."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path

from tests.e2e.harness import (
    agent_config,
    eventually,
    exchange,
    free_port,
    running,
    start_agent,
    start_app,
)
from tests.support.pki import make_ca

ROUTE = """
[[TrafficRoute]]
name = "monolith-to-orders"
mesh = "shop"
destination = "monolith"
  [TrafficRoute.default]
  split = [ {{ service = "orders", tags = {{ version = "v1" }}, weight = {v1} }},
            {{ service = "orders", tags = {{ version = "v2" }}, weight = {v2} }} ]
"""


def test_split_by_policy_and_reload_on_sighup(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.toml").write_text(ROUTE.format(v1=50, v2=50))
    apps = {v: start_app("reply", tmp_path, name=v) for v in ("v1", "v2")}
    with running(*(app for app, _ in apps.values())):
        endpoints = []
        agents = []
        for version, address in (("v1", "127.0.0.3"), ("v2", "127.0.0.4")):
            port = free_port(address)
            config = agent_config(f"orders-{version}", address, ca, "orders", consul=None,
                                  inbound={"port": port, "app_port": apps[version][1]})
            agents.append(start_agent(config, tmp_path, f"orders-{version}"))
            endpoints.append({"address": f"{address}:{port}", "service": "orders",
                              "tags": {"version": version}})
        outbound_port = free_port()
        web_cfg = agent_config("web", "127.0.0.2", ca, "web", consul=None,
                               outbound=[{"service": "monolith", "port": outbound_port,
                                          "endpoints": endpoints}])
        web_cfg["policies"] = str(policies)
        web = start_agent(web_cfg, tmp_path, "web")
        agents.append(web)
        with running(*agents):

            def answers(n: int) -> Counter[bytes]:
                return Counter(exchange(outbound_port, b"hi").split(b" ")[0] for _ in range(n))

            first = answers(60)
            assert set(first) == {b"v1", b"v2"}, first

            (policies / "routes.toml").write_text(ROUTE.format(v1=0, v2=100))
            web.proc.send_signal(signal.SIGHUP)
            eventually(lambda: answers(10) == Counter({b"v2": 10}), within=10,
                       what="the reloaded route sends everything to v2")

            (policies / "routes.toml").write_text(ROUTE.format(v1=-1, v2=100))
            web.proc.send_signal(signal.SIGHUP)
            eventually(lambda: "reload refused" in web.output(), within=10,
                       what="a bad policy is refused")
            assert "default.split[0].weight: must not be negative" in web.output()
            assert answers(10) == Counter({b"v2": 10})  # the policies in force stay
