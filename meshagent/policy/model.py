"""Policy kinds as strict, frozen msgspec Structs (stage 1 of validation: shape).

A policy document is a TOML or JSON table whose keys are kinds and whose values are
lists of resources::

    [[TrafficRoute]]
    name = "orders-migration"
    mesh = "shop"
    destination = "monolith"
      [[TrafficRoute.rule]]
      match = { path_prefix = "/orders" }
      split = [ { service = "orders", weight = 100 } ]

Stage 2 (meaning: weights, regexes, names) is ``policy.validate``.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from meshagent.config.load import Duration


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ValueMatch(_Strict, frozen=True, kw_only=True):
    """How one header or query parameter must look. A bare string in a document means
    ``exact``."""

    exact: str | None = None
    regex: str | None = None
    present: bool | None = None


class RouteMatch(_Strict, frozen=True, kw_only=True):
    """All given conditions must hold (an empty match matches every request)."""

    path: str | None = None  # exact path
    path_prefix: str | None = None  # segment-wise: "/orders" matches /orders and /orders/1
    path_regex: str | None = None  # full match of the path
    method: list[str] = []
    headers: dict[str, str | ValueMatch] = {}
    query: dict[str, str | ValueMatch] = {}


class Rewrite(_Strict, frozen=True, kw_only=True):
    path_prefix: str  # replaces the matched path_prefix


class SplitTarget(_Strict, frozen=True, kw_only=True):
    """A service subset (its endpoints whose tags include ``tags``) and its weight."""

    service: str
    tags: dict[str, str] = {}
    weight: float


class Sticky(_Strict, frozen=True, kw_only=True):
    cookie: str | None = None
    header: str | None = None


class RouteRule(_Strict, frozen=True, kw_only=True):
    match: RouteMatch = RouteMatch()
    rewrite: Rewrite | None = None
    split: list[SplitTarget]
    sticky: Sticky | None = None


class RouteDefault(_Strict, frozen=True, kw_only=True):
    split: list[SplitTarget]
    sticky: Sticky | None = None


class TrafficRoute(_Strict, frozen=True, kw_only=True):
    name: str
    mesh: str
    source: str = "*"
    destination: str
    rule: list[RouteRule] = []
    default: RouteDefault | None = None


class TrafficPermission(_Strict, frozen=True, kw_only=True):
    name: str
    mesh: str
    sources: list[str]
    destination: str


class Timeout(_Strict, frozen=True, kw_only=True):
    name: str
    mesh: str
    destination: str
    route: str | None = None  # a TrafficRoute name; none: every route to destination
    connect: Duration | None = None
    request: Duration | None = None  # the whole request, retries included
    per_try: Duration | None = None
    idle: Duration | None = None


RetryOn = Literal["connect-failure", "reset", "timeout", "5xx", "gateway-error"]


class Retry(_Strict, frozen=True, kw_only=True):
    name: str
    mesh: str
    destination: str
    route: str | None = None
    attempts: int = 3  # tries in all, the first included
    on: list[RetryOn | int] = msgspec.field(default_factory=lambda: ["connect-failure", "reset"])
    idempotent_only: bool = True
    backoff_base: Duration = Duration(0.025)
    backoff_max: Duration = Duration(0.25)
    budget_percent: float = 20.0  # retries may add at most this share of extra load
    min_retries_per_second: float = 10.0


Kind = Literal["TrafficRoute", "TrafficPermission", "Timeout", "Retry"]
Resource = TrafficRoute | TrafficPermission | Timeout | Retry
KINDS: dict[str, type[Resource]] = {
    "TrafficRoute": TrafficRoute,
    "TrafficPermission": TrafficPermission,
    "Timeout": Timeout,
    "Retry": Retry,
}


def kind_of(resource: Resource) -> str:
    return type(resource).__name__
