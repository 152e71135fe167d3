"""The migration demo's parts: the legacy apps' routes and state, the policy document
of each step (checked by the real validators), the share check, and the example files
in examples/migration (decoded and validated as the agent and central agent would)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from meshagent.config.agent import load_agent_config
from meshagent.config.central import load_central
from meshagent.demo.legacy import Monolith, OrdersService
from meshagent.demo.mesh import policies, share_ok
from meshagent.demo.traffic import Tally
from meshagent.policy.compile import compile_route, select_route
from meshagent.policy.load import load_document, load_paths

EXAMPLES = Path(__file__).parents[2] / "examples" / "migration"


def test_the_monolith_keeps_state_and_answers_its_routes() -> None:
    app = Monolith()
    assert app.respond("GET", "/healthz", b"") == (200, {"version": "legacy", "status": "ok"})
    status, answer = app.respond("GET", "/users/3", b"")
    assert status == 200 and answer["user"] == {"id": 3, "name": "user-3"}
    status, answer = app.respond("POST", "/orders", json.dumps({"items": 4}).encode())
    assert status == 201 and answer["order"] == {"id": 1, "items": 4}
    assert app.respond("GET", "/orders", b"")[1]["orders"] == [1]
    assert app.respond("GET", "/orders/1?x=1", b"")[1]["order"] == {"id": 1, "items": 4}
    assert app.respond("POST", "/orders", b"{")[0] == 400
    assert app.respond("DELETE", "/users/3", b"")[0] == 404


def test_orders_v2_differs_visibly_from_v1() -> None:
    v1 = OrdersService("v1").respond("GET", "/orders/5", b"")
    v2 = OrdersService("v2").respond("GET", "/orders/5", b"")
    assert v1 == (200, {"version": "v1", "order": {"id": 5, "items": 1}})
    assert v2[1]["version"] == "v2" and "eta_days" in v2[1]["order"]  # type: ignore[operator]
    assert OrdersService("v1").respond("GET", "/users/5", b"")[0] == 404


@pytest.mark.parametrize(("percent", "weights"), [
    (10, {"v1": 90, "v2": 10}), (50, {"v1": 50, "v2": 50}), (100, {"v2": 100}),
])
def test_each_step_is_a_valid_policy_document(percent: int, weights: dict[str, int]) -> None:
    resources = load_document(policies(percent).encode(), source="step.toml")
    route = compile_route(
        select_route(resources, mesh="shop", source="monolith", destination="monolith"),
        "monolith",
    )
    orders_rule, default = route.rules
    assert orders_rule.match.path_prefix == "/orders"
    assert {dict(b.tags)["version"]: b.weight for b in orders_rule.backends} == weights
    assert [b.service for b in default.backends] == ["monolith"]
    assert load_document(policies(None).encode(), source="p.toml")  # permissions only


def test_the_example_policies_are_the_demos_first_canary() -> None:
    assert load_paths([EXAMPLES / "policies.toml"]) == load_document(
        policies(10).encode(), source="step.toml"
    )


def test_the_example_configs_are_valid() -> None:
    for name in ("monolith", "orders-v1", "orders-v2"):
        config = load_agent_config(EXAMPLES / f"{name}.toml")
        assert config.central is not None and config.mesh == "shop"
    assert load_central(EXAMPLES / "central.toml").listen == "127.0.0.1:5681"


def test_share_ok_is_exact_at_the_ends_and_tolerant_between() -> None:
    tally = Tally()
    tally.served["orders"] = Counter({"orders v1": 880, "orders v2": 120})
    assert share_ok(tally, "orders", "orders v2", 0.10)
    assert not share_ok(tally, "orders", "orders v2", 0.50)
    assert not share_ok(tally, "orders", "orders v2", 0.0)
    tally.served["orders"] = Counter({"orders v2": 10})
    assert share_ok(tally, "orders", "orders v2", 1.0)
    assert share_ok(tally, "orders", "orders v1", 0.0)
    assert not share_ok(Tally(), "orders", "orders v2", 1.0)  # no answers: not met
