"""Policy documents: shape and meaning errors with file, resource and field; compile."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshagent.policy.compile import compile_routes, select_route
from meshagent.policy.load import PolicyError, load_document, load_paths
from meshagent.policy.model import Retry, Timeout, TrafficPermission, TrafficRoute

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"

ROUTE = """
[[TrafficRoute]]
name = "r"
mesh = "shop"
destination = "monolith"
  [[TrafficRoute.rule]]
  match = { path_prefix = "/orders" }
  split = [ { service = "orders", weight = 1 } ]
"""


def test_the_examples_load() -> None:
    resources = load_paths([EXAMPLES])
    kinds = {type(r) for r in resources}
    assert kinds == {TrafficRoute, TrafficPermission, Timeout, Retry}


def test_json_documents_load_too() -> None:
    doc = b'{"TrafficPermission": {"name": "p", "mesh": "shop", "sources": ["*"], "destination": "orders"}}'
    [permission] = load_document(doc, source="p.json")
    assert isinstance(permission, TrafficPermission) and permission.sources == ["*"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("weight = 1", "weight = -1"), 'x.toml: TrafficRoute "r": rule[0].split[0].weight: must not be negative'),
        (("weight = 1", 'weight = "1"'), 'x.toml: TrafficRoute "r": rule[0].split[0].weight: Expected `float`, got `str`'),
        (('path_prefix = "/orders"', 'path_prefix = "orders"'), "rule[0].match.path_prefix: 'orders' must start with /"),
        (('path_prefix = "/orders"', 'path_regex = "(["'), "rule[0].match.path_regex: invalid regex"),
        (('path_prefix = "/orders"', 'path_prefix = "/a", path = "/b"'), "give at most one of path, path_prefix, path_regex"),
        (('mesh = "shop"', 'mesh = "Shop"'), "mesh: 'Shop' is not a valid name"),
        (("[[TrafficRoute]]", "[[TraficRoute]]"), "x.toml: unknown kind 'TraficRoute'; known kinds: TrafficRoute"),
        (('destination = "monolith"', 'destinaton = "monolith"'), "unknown key `destinaton`"),
        (('match = { path_prefix = "/orders" }', 'match = { headers = { "x-a" = { exact = "1", regex = "1" } } }'), "give exactly one of exact, regex, present"),
        (('split = [ { service = "orders", weight = 1 } ]', "split = []"), "rule[0].split: needs at least one target"),
        (("weight = 1 }", 'weight = 1 }, { service = "orders", weight = 1 }'), "the same service and tags appear twice"),
        (("weight = 1 }", 'weight = 100000 }, { service = "b", weight = 1 }'), "below 1/10000 of the total"),
    ],
)
def test_every_problem_names_file_resource_and_field(edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in ROUTE
    with pytest.raises(PolicyError) as info:
        load_document(ROUTE.replace(old, new).encode(), source="x.toml")
    assert any(message in line for line in info.value.problems), info.value.problems
    assert all("\n" not in line for line in info.value.problems)


def test_all_problems_are_reported_and_nothing_is_half_loaded(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(ROUTE)
    (tmp_path / "b.toml").write_text(ROUTE.replace("weight = 1", "weight = -1"))
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(PolicyError) as info:
        load_paths([tmp_path])
    assert len(info.value.problems) == 3
    assert any("c.json: not valid JSON" in p for p in info.value.problems)


def test_a_name_defined_twice_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(ROUTE)
    (tmp_path / "b.toml").write_text(ROUTE)
    with pytest.raises(PolicyError, match='TrafficRoute "r" in mesh \'shop\' is also defined in'):
        load_paths([tmp_path])


def test_timeout_and_retry_meaning() -> None:
    doc = b'[[Timeout]]\nname = "t"\nmesh = "shop"\ndestination = "o"\nper_try = "5s"\nrequest = "1s"\n'
    with pytest.raises(PolicyError, match="per_try: is longer than request"):
        load_document(doc, source="t.toml")
    doc = b'[[Retry]]\nname = "r"\nmesh = "shop"\ndestination = "o"\nattempts = 0\non = [700]\n'
    with pytest.raises(PolicyError) as info:
        load_document(doc, source="r.toml")
    assert len(info.value.problems) == 2
    # connect and idle are per destination: a route-scoped Timeout may not pretend otherwise.
    doc = b'[[Timeout]]\nname = "t"\nmesh = "shop"\ndestination = "o"\nroute = "r"\nconnect = "1s"\nidle = "1m"\n'
    with pytest.raises(PolicyError) as info:
        load_document(doc, source="t.toml")
    fix = "applies to every route of the destination; set it in a Timeout without `route`"
    assert [p.endswith(f"connect: {fix}") or p.endswith(f"idle: {fix}")
            for p in info.value.problems] == [True, True]
    assert info.value.problems[0].startswith('t.toml: Timeout "t": connect: ')


def test_compile_picks_the_most_specific_route_and_keeps_rule_order() -> None:
    resources = load_paths([EXAMPLES])
    specific = load_document(
        ROUTE.replace('name = "r"', 'name = "for-web"\nsource = "web"').encode(), source="x.toml"
    )
    assert select_route(resources + specific, mesh="shop", source="web", destination="monolith") is specific[0]
    chosen = select_route(resources + specific, mesh="shop", source="billing", destination="monolith")
    assert chosen is not None and chosen.name == "orders-migration"
    assert select_route(resources, mesh="other", source="web", destination="monolith") is None

    routes = compile_routes(resources, mesh="shop", source="web", destinations=["monolith", "orders"])
    rules = routes["monolith"].rules
    assert [r.match.headers[0].name if r.match.headers else r.match.path_prefix for r in rules] == [
        "x-canary", "/orders", None
    ]
    assert rules[1].sticky_cookie == "meshagent-canary" and rules[1].rewrite_prefix == "/orders"
    assert [b.weight for b in rules[1].backends] == [95, 5]
    assert routes["monolith"].services() == {"orders", "monolith"}
    # No TrafficRoute for orders: everything to orders itself.
    [implicit] = routes["orders"].rules
    assert implicit.route == "" and implicit.backends[0].service == "orders"


def test_permissions_compile_per_destination() -> None:
    from meshagent.policy.compile import compile_permissions

    doc = b"""
[[TrafficPermission]]
name = "a"
mesh = "shop"
sources = ["web"]
destination = "orders"
[[TrafficPermission]]
name = "b"
mesh = "shop"
sources = ["monolith", "web"]
destination = "orders"
[[TrafficPermission]]
name = "c"
mesh = "billing"
sources = ["*"]
destination = "orders"
"""
    resources = load_document(doc, source="p.toml")
    assert compile_permissions(resources, mesh="shop", destinations=["orders", "payments"]) == {
        "orders": ("monolith", "web")
    }


def test_timeouts_and_retries_compile_per_service_and_route() -> None:
    from meshagent.policy.compile import compile_request_policies

    doc = b"""
[[Timeout]]
name = "all"
mesh = "shop"
destination = "orders"
request = "5s"
per_try = "2s"
connect = "750ms"
idle = "5m"
[[Timeout]]
name = "slow-reports"
mesh = "shop"
destination = "orders"
route = "reports"
request = "30s"
[[Retry]]
name = "r"
mesh = "shop"
destination = "orders"
attempts = 3
on = ["reset", "gateway-error", 500]
"""
    policies = compile_request_policies(load_document(doc, source="t.toml"), mesh="shop", services=["orders", "web"])
    assert set(policies) == {"orders", "orders/reports"}
    base, route = policies["orders"], policies["orders/reports"]
    assert (base.request_seconds, base.per_try_seconds) == (5.0, 2.0)
    assert (base.connect_seconds, base.idle_seconds) == (0.75, 300.0)
    assert base.retry_attempts == 3 and base.retry_on == ("reset",)
    assert base.retry_statuses == (500, 502, 503, 504)
    assert route.request_seconds == 30.0 and route.per_try_seconds == 2.0 and route.retry_attempts == 3


def test_encode_round_trips_every_example() -> None:
    import json

    from meshagent.policy.load import encode
    from meshagent.policy.model import kind_of

    for resource in load_paths([EXAMPLES]):
        document = json.dumps({kind_of(resource): [json.loads(encode(resource))]}).encode()
        assert load_document(document, source="x.json") == [resource]


def test_decode_is_the_inverse_of_encode_and_checks_like_load_document() -> None:
    from meshagent.policy.load import decode, encode
    from meshagent.policy.model import kind_of

    for resource in load_paths([EXAMPLES]):
        assert decode(kind_of(resource), encode(resource), source="stored") == resource
    bad = [
        ("Nope", b"{}", "stored: unknown kind 'Nope'"),
        ("Timeout", b"{not json", "stored: not valid JSON"),
        ("Timeout", b"[]", "stored: expected one Timeout table"),
        ("TrafficPermission", b'{"name": "p", "mesh": "shop", "destination": "a"}',
         'stored: TrafficPermission "p"'),
        ("TrafficRoute", b'{"name": "r", "mesh": "shop", "destination": "m", "rule": '
         b'[{"split": [{"service": "a", "weight": -1}]}]}',
         'stored: TrafficRoute "r": rule[0].split[0].weight'),
    ]
    for kind, data, start in bad:
        with pytest.raises(PolicyError) as refused:
            decode(kind, data, source="stored")
        assert refused.value.problems[0].startswith(start), refused.value.problems
        assert all("\n" not in p for p in refused.value.problems)


def test_connect_and_idle_timeouts_apply_per_destination() -> None:
    from meshagent.snapshot.model import RequestPolicy, Snapshot, Timeouts

    snapshot = Snapshot(
        version=1,
        mesh="shop",
        timeouts=Timeouts(connect_seconds=5.0, idle_seconds=3600.0),
        request_policies={
            "orders": RequestPolicy(connect_seconds=0.5, idle_seconds=60.0),
            "users": RequestPolicy(request_seconds=2.0),
        },
    )
    assert (snapshot.connect_seconds("orders"), snapshot.idle_seconds("orders")) == (0.5, 60.0)
    assert (snapshot.connect_seconds("users"), snapshot.idle_seconds("users")) == (5.0, 3600.0)
    assert (snapshot.connect_seconds("other"), snapshot.idle_seconds("other")) == (5.0, 3600.0)
    # a new connection: the destination's connect deadline, then the agent's handshake's
    assert snapshot.connection_seconds("orders") == 0.5 + Timeouts().handshake_seconds
