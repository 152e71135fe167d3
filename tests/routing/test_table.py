"""Route matching: a table of requests against rules, in order."""

from __future__ import annotations

import pytest

from meshagent.routing.table import RequestFacts, RouteTable, prefix_matches, rewrite_path
from meshagent.snapshot.model import Backend, HttpMatch, OutboundRoutes, RouteRule, ValueMatch

B = (Backend(service="x"),)


def rule(name: str, **match: object) -> RouteRule:
    return RouteRule(route=name, match=HttpMatch(**match), backends=B)  # type: ignore[arg-type]


TABLE = RouteTable(
    OutboundRoutes(
        rules=(
            rule("canary-header", headers=(ValueMatch(name="x-canary", exact="always"),)),
            rule("orders-get", path_prefix="/orders", methods=("GET", "HEAD")),
            rule("exact", path_exact="/health"),
            rule("regex", path_regex=r"/users/\d+"),
            rule("beta-query", query=(ValueMatch(name="beta", present=True),)),
            rule("agent-regex", headers=(ValueMatch(name="user-agent", regex="curl/.*"),)),
            rule("default"),
        )
    )
)


@pytest.mark.parametrize(
    ("method", "target", "headers", "expected"),
    [
        ("GET", "/anything", {"x-canary": ["always"]}, "canary-header"),
        ("GET", "/anything", {"x-canary": ["never", "always"]}, "canary-header"),
        ("GET", "/anything", {"x-canary": ["sometimes"]}, "default"),
        ("GET", "/orders", {}, "orders-get"),
        ("GET", "/orders/7?x=1", {}, "orders-get"),
        ("HEAD", "/orders/", {}, "orders-get"),
        ("POST", "/orders/7", {}, "default"),
        ("GET", "/ordersx", {}, "default"),
        ("GET", "/health", {}, "exact"),
        ("GET", "/health/deep", {}, "default"),
        ("GET", "/users/42", {}, "regex"),
        ("GET", "/users/42/cart", {}, "default"),
        ("GET", "/?beta", {}, "beta-query"),
        ("GET", "/?a=1&beta=&b=2", {}, "beta-query"),
        ("GET", "/?alpha=1", {}, "default"),
        ("GET", "/", {"user-agent": ["curl/8.5"]}, "agent-regex"),
        ("GET", "/", {"user-agent": ["Mozilla curl/8.5"]}, "default"),
        ("GET", "", {}, "default"),
    ],
)
def test_first_matching_rule_wins(
    method: str, target: str, headers: dict[str, list[str]], expected: str
) -> None:
    chosen = TABLE.select(RequestFacts.from_target(method, target, headers))
    assert chosen is not None and chosen.route == expected


def test_no_rule_matches_gives_none() -> None:
    table = RouteTable(OutboundRoutes(rules=(rule("only", path_exact="/a"),)))
    assert table.select(RequestFacts(method="GET", path="/b")) is None


@pytest.mark.parametrize(
    ("prefix", "path", "matches"),
    [("/", "/x", True), ("/a", "/a", True), ("/a", "/a/", True), ("/a", "/a/b", True),
     ("/a", "/ab", False), ("/a/", "/a/b", True), ("/a/", "/a", False), ("/a/b", "/a", False)],
)
def test_prefix_is_segment_wise(prefix: str, path: str, matches: bool) -> None:
    assert prefix_matches(prefix, path) is matches


@pytest.mark.parametrize(
    ("path", "prefix", "replacement", "expected"),
    [("/orders/7", "/orders", "/api", "/api/7"), ("/orders", "/orders", "/api", "/api"),
     ("/orders/7", "/orders", "/", "/7"), ("/orders/7", "/orders/", "/api/", "/api/7"),
     ("/x", "/", "/api", "/api/x"), ("/orders/7", "/orders", "/orders", "/orders/7")],
)
def test_rewrite_never_doubles_slashes(path: str, prefix: str, replacement: str, expected: str) -> None:
    assert rewrite_path(path, prefix, replacement) == expected
