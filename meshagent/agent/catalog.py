"""Follow the healthy endpoints of upstream services in Consul with blocking queries.

Theory of operation (Consul's blocking-query rules, api-docs/features/blocking):
* One loop per service: ``GET /v1/health/service/<name>?passing=1&index=N&wait=W``.
  The first query (index 0) answers at once; later ones wait for a change or ``W``.
* Index bookkeeping is pure (``next_index``): an index that goes backwards (Consul
  restarted, or a server with older state answered) resets to 0, i.e. a fresh
  non-blocking read; an index below 1 is reset to 1, never left at 0, so a buggy
  answer cannot turn the loop into a busy spin of non-blocking queries.
* Rate limit: queries start at least ``_MIN_QUERY_INTERVAL_SECONDS`` apart, however
  fast Consul answers.
* Only instances of our mesh (``Service.Meta["mesh"]``) count. ``publish`` is called
  with the sorted endpoints when they differ from the last published ones (the first
  answer is always published, even when empty).
* Consul trouble: one warning per outage, the last published list stays as it is
  (never replaced by an empty one), retries with jittered exponential backoff.
* Resync grace: a Consul that restarted has lost every registration until the agents
  register again (within one probe interval). So right after an outage or an index
  that went backwards, an *empty* answer does not replace a non-empty list for up to
  ``RESYNC_GRACE_SECONDS``; any non-empty answer is published at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Final

import trio

from meshagent.discovery.consul import Backoff, ConsulClient, ConsulProblem, ServiceEntry
from meshagent.log import get_logger
from meshagent.snapshot.model import Endpoint

log = get_logger("catalog")

_MIN_QUERY_INTERVAL_SECONDS: Final = 0.25
RESYNC_GRACE_SECONDS: Final = 30.0

Publish = Callable[[str, tuple[Endpoint, ...]], None]


def next_index(previous: int, returned: int) -> int:
    """The index for the next blocking query, per Consul's rules. Pure.

    Args:
        previous: the index sent with the query that just answered (0 for none).
        returned: the ``X-Consul-Index`` of its answer.
    """
    if returned < previous:
        return 0
    return max(returned, 1)


def endpoints_of(
    entries: Sequence[ServiceEntry], *, mesh: str, service: str
) -> tuple[Endpoint, ...]:
    """The endpoints of ``service`` in ``mesh`` among ``entries``, sorted. Pure."""
    found: set[Endpoint] = set()
    for entry in entries:
        meta = entry.service.meta or {}
        if meta.get("mesh") != mesh:
            continue
        tags = sorted(
            (key, value)
            for key, sep, value in (tag.partition("=") for tag in entry.service.tags or [])
            if sep and key
        )
        found.add(
            Endpoint(
                host=entry.service.address or entry.node.address,
                port=entry.service.port,
                service=service,
                node=meta.get("node", entry.node.node),
                tags=tuple(tags),
            )
        )
    return tuple(sorted(found, key=lambda e: (e.host, e.port, e.node, e.tags)))


async def follow_consul(
    consul: ConsulClient,
    *,
    mesh: str,
    services: Sequence[str],
    publish: Publish,
    wait_seconds: float = 30.0,
    resync_grace_seconds: float = RESYNC_GRACE_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Publish the passing endpoints of each of ``services`` whenever they change.

    Runs until cancelled; never raises for Consul trouble. Cancel point.

    Args:
        consul: the Consul adapter (not closed here).
        mesh: only instances whose ``Meta["mesh"]`` is this are endpoints.
        services: the upstream services to follow (duplicates are followed once).
        publish: called as ``publish(service, endpoints)`` from the trio thread; must
            not block.
        wait_seconds: longest hold of one blocking query.
        resync_grace_seconds: how long an empty answer right after a resync is held back.
        task_status: ``started()`` once every service had its first query, answered or
            not, so the agent starts while Consul is down.
    """
    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as starting:
            for service in dict.fromkeys(services):
                follow = functools.partial(
                    _follow_service,
                    consul,
                    mesh=mesh,
                    service=service,
                    publish=publish,
                    wait_seconds=wait_seconds,
                    resync_grace_seconds=resync_grace_seconds,
                )
                starting.start_soon(nursery.start, follow)
        task_status.started()


async def _follow_service(
    consul: ConsulClient,
    *,
    mesh: str,
    service: str,
    publish: Publish,
    wait_seconds: float,
    resync_grace_seconds: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The blocking-query loop of one service."""
    index = 0
    published: tuple[Endpoint, ...] | None = None
    backoff = Backoff()
    outage = False
    started = False
    resync_until: float | None = None  # while set, hold back an empty answer
    while True:
        began = trio.current_time()
        try:
            returned, entries = await consul.health_service(
                service, index=index, wait_seconds=wait_seconds, passing_only=True
            )
        except ConsulProblem as exc:
            index = 0  # after an outage Consul may be a new process with lower indexes
            resync_until = None  # the grace starts when it answers again
            delay = backoff.next_delay()
            if not outage:
                log.warning(
                    "consul problem; keeping the last endpoints",
                    service=service,
                    error=str(exc),
                    endpoints=len(published) if published is not None else None,
                    retry_in=round(delay, 2),
                )
                outage = True
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
            continue
        resynced = outage or (index > 0 and returned < index)
        if outage:
            log.info("consul reachable again", service=service)
            outage = False
        if resynced and published:
            resync_until = trio.current_time() + resync_grace_seconds
        backoff.reset()
        index = next_index(index, returned)
        endpoints = endpoints_of(entries, mesh=mesh, service=service)
        holding = (
            not endpoints
            and bool(published)
            and resync_until is not None
            and trio.current_time() < resync_until
        )
        if holding:
            log.info(
                "consul answered empty right after a resync; keeping the last endpoints",
                service=service,
                endpoints=len(published or ()),
                for_seconds=round((resync_until or 0) - trio.current_time(), 1),
            )
        elif endpoints != published:
            publish(service, endpoints)
            published = endpoints
        if endpoints:
            resync_until = None
        if not started:
            started = True
            task_status.started()
        await trio.sleep_until(began + _MIN_QUERY_INTERVAL_SECONDS)


__all__ = ["endpoints_of", "follow_consul", "next_index"]
