"""The health of an agent's inbound services for the central agent's built-in catalog.

With ``[central]`` and without ``[consul]`` nobody else asks the app's health, so the
agent probes it itself (the ``[inbound.health]`` probes of ``agent/probes.py``, as
``keep_registered`` does for Consul's TTL checks) and reports the inbound services
whose probes fail in its status reports (``StatusReport.unhealthy``). The central
agent leaves them out of every caller's catalog.

Theory of operation:

* One task per inbound probes its app every ``health.interval``; each probe ends
  within ``health.timeout`` (``probe_app``). ``HealthBoard`` (pure) keeps the latest
  result of each inbound and answers the set of unhealthy services: a service is
  unhealthy on this host when any of its inbounds fails (callers cannot tell which of
  a host's endpoints of a service they reach; dropping a healthy one costs capacity,
  keeping a failing one costs requests).
* A change of that set updates ``Status`` at once, which wakes ``report_status``; the
  reporter sends at most one report per ``MIN_REPORT_SECONDS``, so a flapping app
  costs the central agent at most one write (and one mesh revision) per second.
* ``keep_app_health`` is started before the reporter and returns from
  ``nursery.start`` once every inbound had its first probe, so the first report
  already says; a probe never raises (``probe_app_safely``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import trio

from meshagent.agent.central import Status
from meshagent.agent.probes import probe_app_safely
from meshagent.config.agent import InboundSettings
from meshagent.log import get_logger

log = get_logger("health")


class HealthBoard:
    """The latest probe result of each inbound (by port) and the unhealthy services.
    Pure; an inbound not probed yet counts as healthy."""

    def __init__(self, inbounds: Iterable[InboundSettings]) -> None:
        self._service = {inbound.port: inbound.service for inbound in inbounds}
        self._failing: set[int] = set()

    def record(self, port: int, *, healthy: bool) -> bool:
        """Note a probe result of the inbound on ``port``. Returns: did the set of
        unhealthy services change?"""
        before = self.unhealthy()
        if healthy:
            self._failing.discard(port)
        elif port in self._service:
            self._failing.add(port)
        return self.unhealthy() != before

    def unhealthy(self) -> list[str]:
        """The services with at least one failing inbound, sorted."""
        return sorted({self._service[port] for port in self._failing})


async def keep_app_health(
    inbounds: Sequence[InboundSettings],
    status: Status,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe the app of each of ``inbounds`` every ``health.interval`` and keep
    ``status.unhealthy`` current (``status.update``, which wakes the reporter). Runs
    until cancelled; never raises for an app's trouble. Cancel point.

    ``task_status.started()`` once every inbound had its first probe.
    """
    board = HealthBoard(inbounds)
    status.update(unhealthy=board.unhealthy())
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            for inbound in inbounds:
                starting.start_soon(nursery.start, _watch_inbound, inbound, board, status)
        task_status.started()


async def _watch_inbound(
    inbound: InboundSettings,
    board: HealthBoard,
    status: Status,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    interval = float(inbound.health.interval)
    was_healthy: bool | None = None
    while True:
        next_tick = trio.current_time() + interval
        result = await probe_app_safely(inbound)
        if result.healthy is not was_healthy:
            report = log.info if result.healthy else log.warning
            event = "app healthy" if result.healthy else "app unhealthy"
            report(event, service=inbound.service, port=inbound.port, output=result.output)
            was_healthy = result.healthy
        if board.record(inbound.port, healthy=result.healthy):
            status.update(unhealthy=board.unhealthy())
        if task_status is not trio.TASK_STATUS_IGNORED:
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
        await trio.sleep_until(next_tick)


__all__ = ["HealthBoard", "keep_app_health"]
