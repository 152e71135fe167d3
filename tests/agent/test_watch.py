"""SnapshotWatch says which route rules a TCP outbound cannot apply, once per change."""

from __future__ import annotations

import msgspec
import pytest

from meshagent.agent.watch import SnapshotWatch
from meshagent.snapshot.model import (
    Backend,
    HttpMatch,
    OutboundListener,
    OutboundRoutes,
    RouteRule,
    Snapshot,
)


def snapshot(version: int, protocol: str, *rules: RouteRule) -> Snapshot:
    outbound = OutboundListener(name="outbound:monolith", service="monolith", source="web",
                                bind="127.0.0.1", port=16001, protocol=protocol)  # type: ignore[arg-type]
    routes = {"monolith": OutboundRoutes(rules=rules)} if rules else {}
    return Snapshot(version=version, mesh="shop", outbounds=(outbound,), routes=routes)


ORDERS = (Backend(service="orders"),)
BY_PATH = RouteRule(route="orders-migration", match=HttpMatch(path_prefix="/orders"), backends=ORDERS)
CATCH_ALL = RouteRule(route="orders-migration", backends=ORDERS)


def test_rules_with_conditions_on_a_tcp_outbound_are_named() -> None:
    problems = snapshot(1, "tcp", BY_PATH, CATCH_ALL).tcp_route_problems()
    assert problems == [
        "outbound outbound:monolith: TrafficRoute orders-migration rule 0 matches on HTTP "
        "fields, but the outbound is TCP, so it never applies; set protocol = \"http\" on "
        "the outbound (and on the inbounds it reaches)"
    ]
    assert snapshot(1, "http", BY_PATH, CATCH_ALL).tcp_route_problems() == []
    assert snapshot(1, "tcp", CATCH_ALL).tcp_route_problems() == []
    assert snapshot(1, "tcp").tcp_route_problems() == []


def test_the_watch_logs_them_at_start_and_when_routes_change(
    capsys: pytest.CaptureFixture[str],
) -> None:
    watch = SnapshotWatch(snapshot(1, "tcp", BY_PATH))
    assert capsys.readouterr().err.count("route rule ignored") == 1
    watch.publish(msgspec.structs.replace(snapshot(1, "tcp", BY_PATH), version=2))
    assert "route rule ignored" not in capsys.readouterr().err  # same routes: said already
    watch.publish(snapshot(3, "tcp", BY_PATH, BY_PATH))
    assert capsys.readouterr().err.count("route rule ignored") == 2
    SnapshotWatch(snapshot(1, "tcp", BY_PATH), warn=False)
    assert "route rule ignored" not in capsys.readouterr().err
