"""Compile TrafficRoutes into the routes one agent's outbounds serve from. Pure.

Which TrafficRoute applies to an outbound ``destination`` called by ``source``: among
the routes of the same mesh and destination, one naming the source beats one with
``source = "*"``; between equals the name that sorts first wins (deterministic, and
``meshagent get policies`` shows it). With no TrafficRoute, everything goes to the
destination service itself (an implicit default rule, ``route = ""``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from meshagent.policy.model import (
    Resource,
    Retry,
    RouteMatch,
    SplitTarget,
    Sticky,
    Timeout,
    TrafficPermission,
    TrafficRoute,
)
from meshagent.policy.model import (
    ValueMatch as PolicyValueMatch,
)
from meshagent.snapshot.model import (
    Backend,
    HttpMatch,
    OutboundRoutes,
    RequestPolicy,
    RouteRule,
    ValueMatch,
)


def select_route(
    resources: Iterable[Resource], *, mesh: str, source: str, destination: str
) -> TrafficRoute | None:
    """The TrafficRoute that governs ``source`` calling ``destination``, if any."""
    candidates = [
        r
        for r in resources
        if isinstance(r, TrafficRoute)
        and r.mesh == mesh
        and r.destination == destination
        and r.source in (source, "*")
    ]
    candidates.sort(key=lambda r: (r.source == "*", r.name))
    return candidates[0] if candidates else None


def _values(items: dict[str, str | PolicyValueMatch], *, lower: bool) -> tuple[ValueMatch, ...]:
    out = []
    for name, value in sorted(items.items()):
        key = name.lower() if lower else name
        if isinstance(value, str):
            out.append(ValueMatch(name=key, exact=value))
        else:
            out.append(
                ValueMatch(
                    name=key, exact=value.exact, regex=value.regex, present=bool(value.present)
                )
            )
    return tuple(out)


def _match(match: RouteMatch) -> HttpMatch:
    return HttpMatch(
        path_exact=match.path,
        path_prefix=match.path_prefix,
        path_regex=match.path_regex,
        methods=tuple(match.method),
        headers=_values(match.headers, lower=True),
        query=_values(match.query, lower=False),
    )


def _backends(split: Sequence[SplitTarget]) -> tuple[Backend, ...]:
    return tuple(
        Backend(service=t.service, tags=tuple(sorted(t.tags.items())), weight=t.weight)
        for t in split
    )


def _rule(
    name: str,
    split: Sequence[SplitTarget],
    sticky: Sticky | None,
    *,
    match: HttpMatch | None = None,
    rewrite_prefix: str | None = None,
) -> RouteRule:
    return RouteRule(
        route=name,
        match=match or HttpMatch(),
        backends=_backends(split),
        rewrite_prefix=rewrite_prefix,
        sticky_cookie=sticky.cookie if sticky else None,
        sticky_header=sticky.header if sticky else None,
    )


def compile_route(route: TrafficRoute | None, destination: str) -> OutboundRoutes:
    """The ordered rules for one outbound (the default, if any, is the last rule)."""
    if route is None:
        return OutboundRoutes(
            rules=(RouteRule(route="", backends=(Backend(service=destination),)),)
        )
    rules = [
        _rule(
            route.name,
            rule.split,
            rule.sticky,
            match=_match(rule.match),
            rewrite_prefix=rule.rewrite.path_prefix if rule.rewrite else None,
        )
        for rule in route.rule
    ]
    if route.default is not None:
        rules.append(_rule(route.name, route.default.split, route.default.sticky))
    return OutboundRoutes(rules=tuple(rules))


def compile_permissions(
    resources: Iterable[Resource], *, mesh: str, destinations: Iterable[str]
) -> dict[str, tuple[str, ...]]:
    """For each destination some TrafficPermission names: every source allowed to call it."""
    wanted = set(destinations)
    allowed: dict[str, set[str]] = {}
    for r in resources:
        if isinstance(r, TrafficPermission) and r.mesh == mesh and r.destination in wanted:
            allowed.setdefault(r.destination, set()).update(r.sources)
    return {d: tuple(sorted(sources)) for d, sources in sorted(allowed.items())}


_STATUS_CLASSES = {"5xx": tuple(range(500, 600)), "gateway-error": (502, 503, 504)}


def compile_request_policies(
    resources: Iterable[Resource], *, mesh: str, services: Iterable[str]
) -> dict[str, RequestPolicy]:
    """Timeout and Retry policies for ``services``, keyed "service" or "service/route";
    a route's entry starts from its service's and overrides what it sets."""
    wanted = set(services)
    fields: dict[str, dict[str, object]] = {}
    ordered = sorted(
        (r for r in resources if isinstance(r, Timeout | Retry) and r.mesh == mesh),
        key=lambda r: (r.route is not None, r.name),  # service-wide first, then per route
    )
    for r in ordered:
        if r.destination not in wanted:
            continue
        key = f"{r.destination}/{r.route}" if r.route else r.destination
        entry = fields.setdefault(key, dict(fields.get(r.destination, {})))
        if isinstance(r, Timeout):
            if r.request is not None:
                entry["request_seconds"] = float(r.request)
            if r.per_try is not None:
                entry["per_try_seconds"] = float(r.per_try)
            if r.connect is not None:
                entry["connect_seconds"] = float(r.connect)
            if r.idle is not None:
                entry["idle_seconds"] = float(r.idle)
        else:
            statuses: set[int] = set()
            kinds: list[str] = []
            for cause in r.on:
                if isinstance(cause, int):
                    statuses.add(cause)
                elif cause in _STATUS_CLASSES:
                    statuses.update(_STATUS_CLASSES[cause])
                elif cause != "connect-failure":
                    kinds.append(cause)
            entry.update(
                retry_attempts=r.attempts,
                retry_on=tuple(sorted(kinds)),
                retry_statuses=tuple(sorted(statuses)),
                retry_idempotent_only=r.idempotent_only,
                backoff_base_seconds=float(r.backoff_base),
                backoff_max_seconds=float(r.backoff_max),
                budget_percent=r.budget_percent,
                min_retries_per_second=r.min_retries_per_second,
            )
    return {key: msgspec.convert(value, RequestPolicy) for key, value in sorted(fields.items())}


def compile_routes(
    resources: Sequence[Resource], *, mesh: str, source: str, destinations: Iterable[str]
) -> dict[str, OutboundRoutes]:
    """Routes for every outbound ``destination`` of an agent whose identity is ``source``."""
    return {
        d: compile_route(select_route(resources, mesh=mesh, source=source, destination=d), d)
        for d in destinations
    }
