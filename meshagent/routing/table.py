"""RouteTable: which rule of an outbound a request takes. Pure; regexes compiled once.

Rules are tried in order and the first whose every condition holds wins, like the
policy reads. Conditions:

* ``path_exact``: the path (without query) equals it.
* ``path_prefix``: segment-wise, so "/orders" matches "/orders", "/orders/" and
  "/orders/7" but not "/ordersx"; "/" matches everything.
* ``path_regex``: the whole path matches.
* ``methods``: the method is one of them.
* ``headers``: for each condition, some value of that header (names are lower case)
  is equal to ``exact`` / fully matches ``regex`` / exists (``present``).
* ``query``: the same over query parameters (``?a=1&a=2`` gives two values of ``a``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from meshagent.snapshot.model import HttpMatch, OutboundRoutes, RouteRule, ValueMatch


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What routing looks at in a request."""

    method: str
    path: str  # without the query
    query: str = ""  # raw, without "?"
    headers: Mapping[str, Sequence[str]] = field(default_factory=dict)

    @classmethod
    def from_target(
        cls, method: str, target: str, headers: Mapping[str, Sequence[str]]
    ) -> RequestFacts:
        path, _, query = target.partition("?")
        return cls(method=method, path=path or "/", query=query, headers=headers)


def prefix_matches(prefix: str, path: str) -> bool:
    """Segment-wise prefix match. Pure."""
    if prefix == "/" or path == prefix:
        return True
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path.startswith(prefix) and path[len(prefix)] == "/"


def rewrite_path(path: str, prefix: str, replacement: str) -> str:
    """Replace the matched ``prefix`` of ``path`` with ``replacement`` ("/orders/7" with
    "/orders" -> "/api" gives "/api/7"), never producing a double slash. Pure."""
    rest = path[len(prefix) :] if prefix != "/" else path
    if not rest:
        return replacement
    if replacement.endswith("/") and rest.startswith("/"):
        rest = rest[1:]
    elif not replacement.endswith("/") and not rest.startswith("/"):
        rest = "/" + rest
    return replacement + rest


class _CompiledValue:
    __slots__ = ("exact", "name", "present", "regex")

    def __init__(self, condition: ValueMatch) -> None:
        self.name = condition.name
        self.exact = condition.exact
        self.regex = re.compile(condition.regex) if condition.regex is not None else None
        self.present = condition.present

    def holds(self, values: Sequence[str]) -> bool:
        if not values:
            return False
        if self.exact is not None:
            return self.exact in values
        if self.regex is not None:
            return any(self.regex.fullmatch(v) for v in values)
        return True  # present


class _CompiledRule:
    __slots__ = ("headers", "match", "methods", "path_regex", "query", "rule")

    def __init__(self, rule: RouteRule) -> None:
        self.rule = rule
        match: HttpMatch = rule.match
        self.match = match
        self.methods = frozenset(match.methods)
        self.path_regex = re.compile(match.path_regex) if match.path_regex else None
        self.headers = tuple(_CompiledValue(c) for c in match.headers)
        self.query = tuple(_CompiledValue(c) for c in match.query)

    def holds(self, request: RequestFacts) -> bool:
        match = self.match
        if self.methods and request.method not in self.methods:
            return False
        if match.path_exact is not None and request.path != match.path_exact:
            return False
        if match.path_prefix is not None and not prefix_matches(match.path_prefix, request.path):
            return False
        if self.path_regex is not None and not self.path_regex.fullmatch(request.path):
            return False
        for condition in self.headers:
            if not condition.holds(request.headers.get(condition.name, ())):
                return False
        if self.query:
            params: dict[str, list[str]] = {}
            for key, value in parse_qsl(request.query, keep_blank_values=True):
                params.setdefault(key, []).append(value)
            for condition in self.query:
                if not condition.holds(params.get(condition.name, ())):
                    return False
        return True


class RouteTable:
    """The compiled rules of one outbound."""

    __slots__ = ("_rules",)

    def __init__(self, routes: OutboundRoutes) -> None:
        self._rules = tuple(_CompiledRule(rule) for rule in routes.rules)

    def select(self, request: RequestFacts) -> RouteRule | None:
        """The first rule whose conditions all hold, or None. Pure."""
        for compiled in self._rules:
            if compiled.holds(request):
                return compiled.rule
        return None
