"""Health of inbound services for the built-in catalog: the pure board, the probing
loop against real loopback sockets, and the status reporter's rate bound."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import trio

from meshagent.agent.central import MIN_REPORT_SECONDS, Joined, Status, report_status
from meshagent.agent.central_client import CentralUnavailable
from meshagent.agent.health import HealthBoard, keep_app_health
from meshagent.config.agent import HealthSettings, InboundSettings
from meshagent.config.load import Duration
from meshagent.demo.ports import free_port
from meshagent.snapshot.wire import StatusReport


def inbound(service: str, port: int, app_port: int = 1, **health: object) -> InboundSettings:
    return InboundSettings(
        service=service,
        port=port,
        app_port=app_port,
        health=HealthSettings(**health),  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------- the board


def test_board_starts_healthy_and_names_failing_services() -> None:
    board = HealthBoard([inbound("web", 1), inbound("api", 2)])
    assert board.unhealthy() == []
    assert board.record(2, healthy=False) is True
    assert board.unhealthy() == ["api"]
    assert board.record(2, healthy=False) is False  # no change
    assert board.record(1, healthy=True) is False
    assert board.record(1, healthy=False) is True
    assert board.unhealthy() == ["api", "web"]
    assert board.record(2, healthy=True) is True
    assert board.unhealthy() == ["web"]


def test_a_service_is_unhealthy_while_any_of_its_inbounds_fails() -> None:
    board = HealthBoard([inbound("web", 1), inbound("web", 2)])
    assert board.record(1, healthy=False) is True
    assert board.record(2, healthy=False) is False  # still just "web"
    assert board.record(1, healthy=True) is False
    assert board.unhealthy() == ["web"]
    assert board.record(2, healthy=True) is True
    assert board.unhealthy() == []


def test_an_unknown_port_changes_nothing() -> None:
    board = HealthBoard([inbound("web", 1)])
    assert board.record(9, healthy=False) is False
    assert board.record(9, healthy=True) is False
    assert board.unhealthy() == []


@pytest.mark.parametrize(
    "results",
    [
        [(1, False), (2, False), (3, False), (1, True), (3, True), (2, True)],
        [(3, False), (3, True), (3, False), (2, False), (1, True), (2, True)],
    ],
)
def test_record_reports_exactly_the_changes_of_the_set(results: list[tuple[int, bool]]) -> None:
    board = HealthBoard([inbound("web", 1), inbound("web", 2), inbound("api", 3)])
    failing: set[int] = set()
    service = {1: "web", 2: "web", 3: "api"}
    for port, healthy in results:
        before = sorted({service[p] for p in failing})
        (failing.discard if healthy else failing.add)(port)
        after = sorted({service[p] for p in failing})
        assert board.record(port, healthy=healthy) is (before != after)
        assert board.unhealthy() == after


# ---------------------------------------------------------------------------- the loop


async def test_keep_app_health_follows_the_app(nursery: trio.Nursery) -> None:
    app_port = free_port()
    fast = {"tcp": True, "interval": Duration(0.05), "timeout": Duration(0.5)}
    status = Status()
    inbounds = [inbound("orders", 15001, app_port, **fast), inbound("admin", 15002)]
    # The app is down: the first probe already says so when start returns.
    await nursery.start(keep_app_health, inbounds, status)
    assert status.unhealthy == ["orders"]
    assert status.report().unhealthy == ["orders"]

    listeners = await trio.open_tcp_listeners(app_port, host="127.0.0.1")
    async with trio.open_nursery() as app:
        app.start_soon(trio.serve_listeners, lambda s: s.aclose(), listeners)
        with trio.fail_after(5):
            while status.unhealthy != []:
                await trio.sleep(0.01)
        app.cancel_scope.cancel()
    with trio.fail_after(5):
        while status.unhealthy != ["orders"]:
            await trio.sleep(0.01)


async def test_keep_app_health_without_inbounds_reports_none_unhealthy() -> None:
    status = Status()
    async with trio.open_nursery() as nursery:
        await nursery.start(keep_app_health, [], status)
        assert status.unhealthy == []
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- reports


class RecordingClient:
    url = "https://central.test"

    def __init__(self, *, fail: bool = False) -> None:
        self.reports: list[tuple[float, StatusReport]] = []
        self.fail = fail

    async def report(self, token: str, mesh: str, dataplane: str, report: StatusReport) -> None:
        self.reports.append((trio.current_time(), report))
        if self.fail:
            raise CentralUnavailable("central agent at https://central.test: no answer")


def joined(tmp_path: Path) -> Joined:
    return Joined(
        directory=tmp_path, url="https://central.test", mesh="shop", dataplane="vm-1",
        identities=["orders"], node_token="n", ca_bundle="",
    )


@pytest.mark.parametrize("fail", [False, True])
async def test_changes_are_reported_at_once_but_at_most_once_a_second(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, fail: bool
) -> None:
    client = RecordingClient(fail=fail)
    status = Status(heartbeat_seconds=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(report_status, client, joined(tmp_path), status)
        await trio.sleep(0.1)
        assert len(client.reports) == 1
        start = trio.current_time()
        # A flapping app: forty changes in two seconds.
        for n in range(40):
            status.update(unhealthy=["orders"] if n % 2 == 0 else [])
            await trio.sleep(0.05)
        status.update(unhealthy=["orders"])
        await trio.sleep(1.5)
        nursery.cancel_scope.cancel()
    times = [at for at, _ in client.reports]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= MIN_REPORT_SECONDS - 1e-9 for gap in gaps)
    during = [at for at in times if at >= start]
    assert 2 <= len(during) <= 4  # about one a second, not forty
    assert client.reports[-1][1].unhealthy == ["orders"]  # the latest state got through
    assert client.reports[0][1].unhealthy is None  # nothing probed: it does not say


async def test_a_quiet_status_is_reported_every_heartbeat(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    client = RecordingClient()
    status = Status(heartbeat_seconds=3.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(report_status, client, joined(tmp_path), status)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    times = [at for at, _ in client.reports]
    assert len(times) == 4 and times[1] - times[0] == pytest.approx(3.0)
