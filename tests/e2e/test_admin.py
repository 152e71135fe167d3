"""The agent's admin endpoint, read with a real HTTP client from a real agent process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

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


def test_ready_stats_snapshot_and_metrics(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    app, app_port = start_app("echo", tmp_path, name="echo")
    inbound_port, outbound_port = free_port("127.0.0.3"), free_port()
    orders_cfg = agent_config("orders", "127.0.0.3", ca, "orders", consul=None,
                              inbound={"port": inbound_port, "app_port": app_port})
    web_cfg = agent_config("web", "127.0.0.2", ca, "web", consul=None,
                           outbound=[{"service": "orders", "port": outbound_port,
                                      "endpoints": [f"127.0.0.3:{inbound_port}"]}])
    with running(app):
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web), httpx.Client(base_url=f"http://{web_cfg['admin']}", trust_env=False) as admin:
            for _ in range(3):
                assert exchange(outbound_port, b"hello") == b"hello"
            assert admin.get("/ready").text == "ready\n"
            listener = f"outbound:orders:{outbound_port}"
            eventually(lambda: admin.get("/stats").json()[listener]["accepted"] == 3, within=5,
                       what="stats count the connections")
            stats = admin.get("/stats").json()[listener]
            assert stats["failed"] == 0 and stats["bytes_out"] == 15 and stats["bytes_in"] == 15
            snapshot = json.loads(admin.get("/snapshot").content)
            assert snapshot["mesh"] == "shop" and snapshot["endpoints"]["orders"][0]["port"] == inbound_port
            metrics = admin.get("/metrics")
            assert metrics.status_code == 200
            assert f'meshagent_connections_total{{listener="{listener}",mesh="shop"}} 3.0' in metrics.text
            assert 'meshagent_certificate_expiry_timestamp_seconds{mesh="shop",service="web"}' in metrics.text
            assert admin.get("/nope").status_code == 404
            assert admin.post("/ready").status_code == 405
