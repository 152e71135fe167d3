"""The Prometheus collector reads the data path's counters at scrape time."""

from __future__ import annotations

from prometheus_client import generate_latest

from meshagent.agent.metrics import AgentCollector, new_registry
from meshagent.dataplane.connection import ConnectionCounters
from meshagent.snapshot.model import Snapshot


def scrape(counters: dict[str, ConnectionCounters]) -> str:
    """The exposition of an agent with these per-listener counters, in mesh "shop"."""
    registry = new_registry(
        AgentCollector(lambda: counters, lambda: None, lambda: Snapshot(version=1, mesh="shop"), {})
    )
    return generate_latest(registry).decode()


def test_plaintext_callers_of_inbounds_are_counted_for_the_strict_switch() -> None:
    text = scrape({
        "inbound:orders:15443": ConnectionCounters(accepted=5, plaintext=2),
        "outbound:users:16001": ConnectionCounters(accepted=7),
    })
    assert (
        'meshagent_inbound_plaintext_connections_total{listener="inbound:orders:15443",'
        'mesh="shop"} 2.0'
    ) in text
    assert 'meshagent_inbound_plaintext_connections_total{listener="outbound' not in text
    assert 'meshagent_connections_total{listener="outbound:users:16001",mesh="shop"} 7.0' in text


def test_processes_and_worker_restarts_are_exposed() -> None:
    registry = new_registry(
        AgentCollector(dict, lambda: None, lambda: Snapshot(version=1, mesh="shop"), {},
                       lambda: (3, 2))
    )
    text = generate_latest(registry).decode()
    assert 'meshagent_processes{mesh="shop"} 3.0' in text
    assert 'meshagent_worker_restarts_total{mesh="shop"} 2.0' in text
    single = generate_latest(new_registry(AgentCollector(
        dict, lambda: None, lambda: Snapshot(version=1, mesh="shop"), {}))).decode()
    assert 'meshagent_processes{mesh="shop"} 1.0' in single
    assert 'meshagent_worker_restarts_total{mesh="shop"} 0.0' in single


def test_http_requests_turned_away_by_a_busy_endpoint_are_counted() -> None:
    counters = {
        "outbound:orders:16001": ConnectionCounters(accepted=9, busy=3),
        "inbound:users:15443": ConnectionCounters(accepted=2),
    }
    text = scrape(counters)
    assert 'meshagent_http_busy_total{listener="outbound:orders:16001",mesh="shop"} 3.0' in text
    assert 'meshagent_http_busy_total{listener="inbound:users:15443",mesh="shop"} 0.0' in text
    summed = ConnectionCounters(busy=1)
    summed.add(counters["outbound:orders:16001"])  # across workers
    assert summed.busy == 4


def test_a_listener_s_pool_is_shown_as_gauges_summed_over_workers() -> None:
    pooled = ConnectionCounters(pooled=True, pool_idle=3, pool_connecting=1, pool_waiting=2)
    other_worker = ConnectionCounters(pooled=True, pool_idle=1, pool_waiting=1)
    pooled.add(other_worker)
    text = scrape({
        "outbound:orders:16001": pooled,
        "inbound:users:15443": ConnectionCounters(accepted=2),  # no pool
    })
    where = 'listener="outbound:orders:16001",mesh="shop"'
    assert f"meshagent_pool_idle_connections{{{where}}} 4.0" in text
    assert f"meshagent_pool_connects_in_progress{{{where}}} 1.0" in text
    assert f"meshagent_pool_requests_waiting{{{where}}} 3.0" in text
    assert 'meshagent_pool_idle_connections{listener="inbound' not in text
    other_worker.retire()  # its process is gone: its gauges no longer count
    assert (other_worker.pool_idle, other_worker.pool_waiting, other_worker.active) == (0, 0, 0)
