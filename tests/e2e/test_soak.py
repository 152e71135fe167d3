"""Soak: minutes of churn through the agent pair must not leak memory or fail.

Slow (about 90 s): kept out of the default run. Run it with
``bash scripts/test.sh -m slow``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from meshagent.demo.consul import ConsulProcess
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

pytestmark = pytest.mark.slow


def test_connection_churn_leaks_nothing(tmp_path: Path, consul: ConsulProcess) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    app, app_port = start_app("echo", tmp_path, name="echo")
    inbound_port, outbound_port = free_port("127.0.0.3"), free_port()
    orders_cfg = agent_config("orders", "127.0.0.3", ca, "orders", consul=consul,
                              inbound={"port": inbound_port, "app_port": app_port})
    web_cfg = agent_config("web", "127.0.0.2", ca, "web", consul=consul,
                           outbound=[{"service": "orders", "port": outbound_port}])
    for config in (orders_cfg, web_cfg):
        config["log"] = {"level": "warning"}
    with running(app):
        orders = start_agent(orders_cfg, tmp_path, "orders")
        web = start_agent(web_cfg, tmp_path, "web")
        with running(orders, web):
            eventually(lambda: exchange(outbound_port, b"ping") == b"ping", within=10,
                       what="web sees orders")
            failures: list[str] = []
            done = 0
            stop = time.monotonic() + 75
            samples: dict[str, list[int]] = {"orders": [], "web": []}

            def worker() -> None:
                nonlocal done
                while time.monotonic() < stop:
                    payload = b"x" * 4096
                    try:
                        if exchange(outbound_port, payload) != payload:
                            failures.append("short answer")
                    except OSError as exc:
                        failures.append(str(exc))
                    done += 1

            threads = [threading.Thread(target=worker) for _ in range(8)]
            for thread in threads:
                thread.start()
            while time.monotonic() < stop:
                samples["orders"].append(orders.rss())
                samples["web"].append(web.rss())
                time.sleep(5)
            for thread in threads:
                thread.join(30)
            assert not failures, f"{len(failures)} of {done} failed, e.g. {failures[0]}"
            for name, rss in samples.items():
                warm, last = rss[2], rss[-1]  # after 10 s of warm-up vs. the end
                assert last - warm < 8 << 20, f"{name} grew {(last - warm) >> 20} MiB over {done} connections"
