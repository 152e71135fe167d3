"""The strangler fig on real processes: a legacy monolith and a new orders service in
two versions, HTTP agents registered in a real Consul, and a route that peels /orders
off the monolith with a 90/10 canary. Clients are real (httpx)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshagent.demo.consul import ConsulProcess
from tests.e2e.harness import agent_config, eventually, free_port, running, start_agent, start_app
from tests.support.pki import make_ca

POLICY = """
[[TrafficRoute]]
name = "orders-migration"
mesh = "shop"
destination = "monolith"
  [[TrafficRoute.rule]]
  match = { headers = { "x-canary" = "always" } }
  split = [ { service = "orders", tags = { version = "v2" }, weight = 100 } ]
  [[TrafficRoute.rule]]
  match = { path_prefix = "/orders" }
  rewrite = { path_prefix = "/api/orders" }
  split = [ { service = "orders", tags = { version = "v1" }, weight = 90 },
            { service = "orders", tags = { version = "v2" }, weight = 10 } ]
  [TrafficRoute.default]
  split = [ { service = "monolith", weight = 100 } ]
"""


def test_strangler_route_and_canary_through_http_agents(tmp_path: Path, consul: ConsulProcess) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.toml").write_text(POLICY)
    hosts = [("monolith", "127.0.0.3", "monolith", "v1"), ("orders-v1", "127.0.0.4", "orders", "v1"),
             ("orders-v2", "127.0.0.5", "orders", "v2")]
    apps = {name: start_app("http", tmp_path, name=name) for name, *_ in hosts}
    with running(*(app for app, _ in apps.values())):
        agents = []
        for name, address, service, version in hosts:
            config = agent_config(name, address, ca, service, consul=consul, inbound={
                "port": free_port(address), "app_port": apps[name][1], "protocol": "http",
                "tags": {"version": version}})
            agents.append(start_agent(config, tmp_path, name))
        web_port = free_port()
        web_cfg = agent_config("web", "127.0.0.2", ca, "web", consul=consul,
                               outbound=[{"service": "monolith", "port": web_port, "protocol": "http"}])
        web_cfg["policies"] = str(policies)
        access_log = tmp_path / "web-access.log"
        web_cfg["log"] = {"level": "debug", "access": str(access_log)}
        agents.append(start_agent(web_cfg, tmp_path, "web"))
        with running(*agents), httpx.Client(base_url=f"http://127.0.0.1:{web_port}", trust_env=False,
                                            timeout=10) as http:

            def apps_for(path: str, n: int, **headers: str) -> Counter[str]:
                return Counter(http.get(path, headers=headers).json()["app"] for _ in range(n))

            eventually(lambda: http.get("/orders/1").status_code == 200
                       and set(apps_for("/orders/1", 60)) == {"orders-v1", "orders-v2"},
                       within=20, what="web sees every instance in Consul")
            assert apps_for("/users/7", 20) == Counter({"monolith": 20})
            assert apps_for("/orders/7", 10, **{"x-canary": "always"}) == Counter({"orders-v2": 10})
            split = apps_for("/orders/7", 400)
            assert 0.05 <= split["orders-v2"] / 400 <= 0.15, split
            seen = http.get("/orders/7?id=3").json()
            assert seen["path"] == "/api/orders/7?id=3" and seen["source"] == "web"
            metrics = httpx.get(f"http://{web_cfg['admin']}/metrics", trust_env=False).text
            v2 = ('meshagent_http_requests_total{code_class="2xx",destination="monolith",'
                  'mesh="shop",route="orders-migration",source="",subset="orders[version=v2]"}')
            assert v2 in metrics
            assert 'meshagent_http_request_duration_seconds_bucket{destination="monolith"' in metrics
            pool = f'listener="outbound:monolith:{web_port}",mesh="shop"'
            idle = re.search(rf"^meshagent_pool_idle_connections{{{pool}}} (\S+)$", metrics, re.M)
            assert idle is not None and float(idle[1]) >= 1, "three endpoints, one relayed to"
            assert f"meshagent_pool_connects_in_progress{{{pool}}} 0.0" in metrics
            assert f"meshagent_pool_requests_waiting{{{pool}}} 0.0" in metrics
            lines = access_log.read_text().splitlines()
            assert len(lines) >= 490 and all("logger=access" in line for line in lines)
            assert any("path=/users/7" in line and "status=200" in line for line in lines)
            assert "logger=access" not in agents[-1].output()


def test_a_256_mib_upload_streams_with_bounded_agent_memory(tmp_path: Path) -> None:
    import threading

    ca = make_ca(tmp_path / "ca", "shop")
    app, app_port = start_app("http", tmp_path, name="sink")
    inbound_port, outbound_port = free_port("127.0.0.3"), free_port()
    orders_cfg = agent_config("orders", "127.0.0.3", ca, "orders", consul=None, inbound={
        "port": inbound_port, "app_port": app_port, "protocol": "http"})
    web_cfg = agent_config("web", "127.0.0.2", ca, "web", consul=None, outbound=[{
        "service": "orders", "port": outbound_port, "protocol": "http",
        "endpoints": [f"127.0.0.3:{inbound_port}"]}])
    for config in (orders_cfg, web_cfg):
        config["log"] = {"level": "warning"}
    with running(app):
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            before = {a.name: a.rss() for a in (orders, web)}
            peak = dict(before)
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.05):
                    for agent in (orders, web):
                        peak[agent.name] = max(peak[agent.name], agent.rss())

            sampler = threading.Thread(target=sample)
            sampler.start()
            size = 256 * 1024 * 1024
            chunk = b"u" * (1 << 20)

            def body() -> Iterator[bytes]:
                for _ in range(size // len(chunk)):
                    yield chunk

            try:
                response = httpx.post(f"http://127.0.0.1:{outbound_port}/upload", content=body(),
                                      trust_env=False, timeout=120)
            finally:
                done.set()
                sampler.join()
            assert response.status_code == 200 and response.json()["received"] == size
            for name in ("orders", "web"):
                growth = peak[name] - before[name]
                assert growth < 48 << 20, f"{name} grew {growth >> 20} MiB for a 256 MiB upload"


@pytest.mark.slow
def test_a_95_5_split_over_20000_requests_lands_within_0_6_percent(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "routes.toml").write_text(POLICY.replace("weight = 90", "weight = 95").replace(
        'tags = { version = "v2" }, weight = 10', 'tags = { version = "v2" }, weight = 5'))
    apps = {v: start_app("http", tmp_path, name=f"orders-{v}") for v in ("v1", "v2")}
    with running(*(app for app, _ in apps.values())):
        agents, endpoints = [], []
        for version, address in (("v1", "127.0.0.4"), ("v2", "127.0.0.5")):
            port = free_port(address)
            config = agent_config(f"orders-{version}", address, ca, "orders", consul=None, inbound={
                "port": port, "app_port": apps[version][1], "protocol": "http"})
            config["log"] = {"level": "warning"}
            agents.append(start_agent(config, tmp_path, f"orders-{version}"))
            endpoints.append({"address": f"{address}:{port}", "service": "orders",
                              "tags": {"version": version}})
        web_port = free_port()
        web_cfg = agent_config("web", "127.0.0.2", ca, "web", consul=None, outbound=[{
            "service": "monolith", "port": web_port, "protocol": "http", "endpoints": endpoints}])
        web_cfg["policies"] = str(policies)
        web_cfg["log"] = {"level": "warning"}
        agents.append(start_agent(web_cfg, tmp_path, "web"))
        with running(*agents), httpx.Client(base_url=f"http://127.0.0.1:{web_port}",
                                            trust_env=False, timeout=10) as http:
            counts = Counter(http.get("/orders/1").json()["app"] for _ in range(20_000))
    assert abs(counts["orders-v2"] / 20_000 - 0.05) <= 0.006, counts
