"""The dataplane records and the config compiler (pure: records in, a config out)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent.central.dataplanes import (
    HEARTBEAT_SECONDS,
    ONLINE_WITHIN_SECONDS,
    catalog,
    compile_config,
    dataplane_view,
    decode_policies,
    decode_spec,
    is_online,
    new_dataplane,
    online_window,
    panicking_services,
    silent_dataplanes,
)
from meshagent.central.meshes import MtlsMode, new_mesh, policy_records, with_settings
from meshagent.central.store import DataplaneRecord, MeshRecord, PolicyRecord
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes
from meshagent.policy.load import load_document
from meshagent.snapshot.model import Backend, Endpoint, RequestPolicy
from meshagent.snapshot.wire import InboundSpec, JoinRequest, OutboundSpec
from tests.test_layers import imports_of

NOW = 1_800_000_000.0
PURE_MODULES = ("dataplanes.py", "joining.py", "meshes.py")

POLICIES = b"""
[[TrafficRoute]]
name = "orders-migration"
mesh = "shop"
destination = "monolith"
  [[TrafficRoute.rule]]
  match = { path_prefix = "/orders" }
  split = [ { service = "orders", weight = 90, tags = { version = "v2" } },
            { service = "orders", weight = 10, tags = { version = "v1" } } ]
  [TrafficRoute.default]
  split = [ { service = "monolith", weight = 100 } ]

[[TrafficRoute]]
name = "batch-only"
mesh = "shop"
source = "batch"
destination = "monolith"
  [TrafficRoute.default]
  split = [ { service = "legacy", weight = 100 } ]

[[TrafficPermission]]
name = "callers-of-web"
mesh = "shop"
sources = ["gateway"]
destination = "web"

[[TrafficPermission]]
name = "callers-of-orders"
mesh = "shop"
sources = ["web"]
destination = "orders"

[[Timeout]]
name = "orders-timeouts"
mesh = "shop"
destination = "orders"
request = "3s"

[[Retry]]
name = "unrelated"
mesh = "shop"
destination = "payments"
"""


@cache
def shop(default_allow: bool = True, mtls: MtlsMode = "strict") -> MeshRecord:
    record = new_mesh(
        "shop",
        mtls="strict",
        ca="builtin",
        seal_key=key_from_file_bytes(new_key_file_bytes()),
        now=NOW,
    )
    return with_settings(record, mtls=mtls, default_allow=default_allow)


def stored_policies(document: bytes = POLICIES) -> list[PolicyRecord]:
    records, problems = policy_records("shop", load_document(document, source="p.toml"), now=NOW)
    assert not problems
    return records


def dataplane(
    name: str,
    address: str,
    *,
    inbounds: list[InboundSpec] | None = None,
    outbounds: list[OutboundSpec] | None = None,
    **changes: Any,
) -> DataplaneRecord:
    request = JoinRequest(
        mesh="shop",
        dataplane=name,
        node=f"node-{name}",
        address=address,
        inbounds=inbounds or [],
        outbounds=outbounds or [],
        csrs={},
    )
    record = new_dataplane(request, node_token_id=f"tok-{name}", now=NOW, cert_not_after=NOW + 3600)
    return msgspec.structs.replace(record, **changes)


WEB = dataplane(
    "web-1",
    "10.0.0.1",
    inbounds=[InboundSpec(service="web", port=15443, protocol="http", tags={"version": "v1"})],
    outbounds=[OutboundSpec(service="monolith", port=16001, protocol="http", source="web")],
)
ORDERS_V1 = dataplane(
    "orders-1",
    "10.0.0.3",
    inbounds=[InboundSpec(service="orders", port=15443, tags={"version": "v1", "zone": "a"})],
)
ORDERS_V2 = dataplane(
    "orders-2",
    "10.0.0.2",
    inbounds=[
        InboundSpec(service="orders", port=15443, tags={"version": "v2"}),
        InboundSpec(service="orders", port=15444, tags={"version": "v2"}),
    ],
)
MONOLITH = dataplane(
    "mono", "10.0.0.9", inbounds=[InboundSpec(service="monolith", port=15443)]
)
BANK = [ORDERS_V1, ORDERS_V2, MONOLITH, WEB]


def compile_for(
    target: DataplaneRecord,
    *,
    mesh: MeshRecord | None = None,
    policies: list[PolicyRecord] | None = None,
    dataplanes: list[DataplaneRecord] | None = None,
) -> Any:
    return compile_config(
        mesh or shop(),
        revision=42,
        policies=stored_policies() if policies is None else policies,
        dataplane=target,
        dataplanes=BANK if dataplanes is None else dataplanes,
    )


def test_these_modules_are_pure() -> None:
    central = Path(__file__).parents[2] / "meshagent" / "central"
    for module in PURE_MODULES:
        imported = imports_of(central / module)
        assert not {"trio", "httpx", "starlette"} & {name.split(".")[0] for name in imported}
        assert not any(name.startswith("meshagent.central.store.") for name in imported)


def test_new_dataplane_record_and_spec() -> None:
    assert (WEB.mesh, WEB.name, WEB.node, WEB.address) == ("shop", "web-1", "node-web-1", "10.0.0.1")
    assert WEB.services == ("web",)
    assert (WEB.applied_version, WEB.last_seen, WEB.cert_not_after, WEB.last_error) == (
        0, NOW, NOW + 3600, ""
    )
    spec = decode_spec(WEB)
    assert spec.node_token_id == "tok-web-1"
    assert spec.inbounds[0].tags == {"version": "v1"} and spec.outbounds[0].source == "web"


def test_config_carries_the_mesh_settings_and_version() -> None:
    config = compile_for(WEB).config
    assert (config.version, config.mesh, config.mtls, config.default_allow) == (
        42, "shop", "strict", True
    )
    assert config.ca_bundle.startswith("-----BEGIN CERTIFICATE-----")
    strict = compile_for(WEB, mesh=shop(default_allow=False, mtls="permissive")).config
    assert (strict.mtls, strict.default_allow) == ("permissive", False)


def test_routes_follow_the_traffic_route_of_each_outbound_source() -> None:
    routes = compile_for(WEB).config.routes
    assert list(routes) == ["monolith"]
    rules = routes["monolith"].rules
    assert [rule.route for rule in rules] == ["orders-migration", "orders-migration"]
    assert rules[0].match.path_prefix == "/orders"
    assert rules[0].backends == (
        Backend(service="orders", tags=(("version", "v2"),), weight=90),
        Backend(service="orders", tags=(("version", "v1"),), weight=10),
    )
    assert rules[1].backends == (Backend(service="monolith", weight=100),)
    # The batch source has a route of its own.
    batch = dataplane(
        "batch-1", "10.0.0.5",
        outbounds=[OutboundSpec(service="monolith", port=16001, source="batch")],
    )
    routes = compile_for(batch).config.routes
    assert routes["monolith"].rules[0].backends == (Backend(service="legacy", weight=100),)


def test_an_outbound_without_a_route_goes_to_its_service() -> None:
    config = compile_for(WEB, policies=[]).config
    rules = config.routes["monolith"].rules
    assert len(rules) == 1 and rules[0].route == "" and rules[0].backends == (
        Backend(service="monolith"),
    )
    assert config.permissions == {} and config.request_policies == {}
    assert list(config.endpoints) == ["monolith"]


def test_permissions_are_those_of_its_inbound_services() -> None:
    assert compile_for(WEB).config.permissions == {"web": ("gateway",)}
    assert compile_for(ORDERS_V1).config.permissions == {"orders": ("web",)}
    assert compile_for(MONOLITH).config.permissions == {}


def test_request_policies_of_every_service_its_routes_reach() -> None:
    policies = compile_for(WEB).config.request_policies
    assert policies == {"orders": RequestPolicy(request_seconds=3.0)}
    assert compile_for(ORDERS_V1).config.request_policies == {}  # no outbounds


def test_endpoints_are_the_inbounds_of_every_dataplane_serving_a_reachable_service() -> None:
    endpoints = compile_for(WEB).config.endpoints
    assert list(endpoints) == ["monolith", "orders"]
    assert endpoints["orders"] == (
        Endpoint(host="10.0.0.2", port=15443, service="orders", node="node-orders-2",
                 tags=(("version", "v2"),)),
        Endpoint(host="10.0.0.2", port=15444, service="orders", node="node-orders-2",
                 tags=(("version", "v2"),)),
        Endpoint(host="10.0.0.3", port=15443, service="orders", node="node-orders-1",
                 tags=(("version", "v1"), ("zone", "a"))),
    )
    assert endpoints["monolith"] == (
        Endpoint(host="10.0.0.9", port=15443, service="monolith", node="node-mono"),
    )
    # Order of the records does not matter; a reachable service nobody serves is empty.
    alone = compile_for(WEB, dataplanes=[WEB, ORDERS_V1]).config.endpoints
    assert alone["monolith"] == () and len(alone["orders"]) == 1
    assert compile_for(WEB, dataplanes=list(reversed(BANK))).config == compile_for(WEB).config


def test_a_dataplane_can_reach_its_own_service() -> None:
    selfish = dataplane(
        "self-1", "10.0.0.7",
        inbounds=[InboundSpec(service="web", port=15443)],
        outbounds=[OutboundSpec(service="web", port=16002, source="web")],
    )
    endpoints = compile_for(selfish, dataplanes=[selfish]).config.endpoints
    assert endpoints == {"web": (Endpoint(host="10.0.0.7", port=15443, service="web", node="node-self-1"),)}


def test_catalog_directly() -> None:
    assert catalog([], BANK) == {}
    assert catalog(["nothing"], BANK) == {"nothing": ()}
    assert [e.node for e in catalog(["orders"], BANK)["orders"]] == [
        "node-orders-2", "node-orders-2", "node-orders-1"
    ]


def test_a_stored_policy_that_no_longer_decodes_is_skipped_and_reported() -> None:
    good = stored_policies()
    broken = [
        PolicyRecord(mesh="shop", kind="TrafficRoute", name="old", updated_at=NOW,
                     spec=b'{"name": "old", "mesh": "shop", "destination": "monolith", "weights": 1}'),
        PolicyRecord(mesh="shop", kind="MeshGateway", name="gw", updated_at=NOW, spec=b"{}"),
    ]
    resources, skipped = decode_policies([*broken, *good])
    assert len(resources) == len(good) and len(skipped) == 2
    assert skipped[0].startswith('stored policy TrafficRoute/old of mesh shop: TrafficRoute "old"')
    assert "weights" in skipped[0]
    assert skipped[1].startswith("stored policy MeshGateway/gw of mesh shop: unknown kind")
    compiled = compile_for(WEB, policies=[*broken, *good])
    assert compiled.skipped == skipped
    assert compiled.config == compile_for(WEB).config


def test_online_within_three_heartbeats() -> None:
    assert ONLINE_WITHIN_SECONDS == 3 * HEARTBEAT_SECONDS == 30.0
    assert is_online(WEB, NOW + 30.0)
    assert not is_online(WEB, NOW + 30.5)


def test_view_shows_status_and_no_secret() -> None:
    record = msgspec.structs.replace(WEB, applied_version=41, last_error="bad route")
    view = dataplane_view(record, now=NOW + 5, latest_version=42)
    assert view == {
        "name": "web-1",
        "mesh": "shop",
        "node": "node-web-1",
        "address": "10.0.0.1",
        "services": ["web"],
        "online": True,
        "in_catalog": True,
        "last_seen": NOW,
        "applied_version": 41,
        "latest_version": 42,
        "cert_not_after": NOW + 3600,
        "cert_issuers": [],
        "on_current_ca": None,
        "has_new_bundle": None,
        "unhealthy": [],
        "last_error": "bad route",
        "inbounds": [{"service": "web", "port": 15443, "protocol": "http", "tags": {"version": "v1"}}],
        "outbounds": [{"service": "monolith", "port": 16001, "protocol": "http", "source": "web"}],
        "node_token_id": "tok-web-1",
    }
    assert dataplane_view(record, now=NOW + 60, latest_version=42)["online"] is False
    # The window follows the heartbeat; in_catalog follows the stored flag.
    assert dataplane_view(record, now=NOW + 4, latest_version=42, within=3)["online"] is False
    marked = msgspec.structs.replace(record, offline=True)
    assert dataplane_view(marked, now=NOW + 60, latest_version=42)["in_catalog"] is False


def test_dataplanes_marked_offline_leave_the_catalog_of_every_caller() -> None:
    gone = msgspec.structs.replace(ORDERS_V2, offline=True)
    endpoints = compile_for(WEB, dataplanes=[ORDERS_V1, gone, MONOLITH, WEB]).config.endpoints
    assert [e.node for e in endpoints["orders"]] == ["node-orders-1"]
    # Every endpoint of the service gone: an empty list, not the dead ones.
    both = [gone, msgspec.structs.replace(ORDERS_V1, offline=True), MONOLITH, WEB]
    assert compile_for(WEB, dataplanes=both).config.endpoints["orders"] == ()
    # Its own config still compiles (it may come back, and then needs its routes).
    assert compile_for(gone, dataplanes=[gone, WEB]).config.mesh == "shop"


def test_unhealthy_services_leave_the_catalog_of_every_caller() -> None:
    sick = msgspec.structs.replace(ORDERS_V2, unhealthy=("orders",))
    records = [ORDERS_V1, sick, MONOLITH, WEB]
    for caller in (WEB, ORDERS_V1, sick):
        caller_spec = msgspec.structs.replace(
            caller, spec=msgspec.json.encode(msgspec.structs.replace(
                decode_spec(caller),
                outbounds=(OutboundSpec(service="orders", port=16009, source="web"),),
            )),
        )
        endpoints = compile_for(caller_spec, dataplanes=records).config.endpoints
        assert [e.node for e in endpoints["orders"]] == ["node-orders-1"]
    assert panicking_services(["orders", "monolith"], records) == []


def test_only_the_unhealthy_service_of_a_dataplane_leaves() -> None:
    both = dataplane(
        "both", "10.0.0.5",
        inbounds=[InboundSpec(service="orders", port=15443),
                  InboundSpec(service="monolith", port=15444)],
        unhealthy=("monolith",),
    )
    found = catalog(["orders", "monolith"], [both, MONOLITH])
    assert [(e.host, e.port) for e in found["orders"]] == [("10.0.0.5", 15443)]
    assert [(e.host, e.port) for e in found["monolith"]] == [("10.0.0.9", 15443)]
    # A name it does not serve changes nothing.
    odd = msgspec.structs.replace(MONOLITH, unhealthy=("ghost",))
    assert catalog(["monolith"], [odd]) == catalog(["monolith"], [MONOLITH])


def test_every_endpoint_unhealthy_is_panic_they_all_stay() -> None:
    """Panic: a probe that fails everywhere must not leave callers with no endpoint."""
    sick_1 = msgspec.structs.replace(ORDERS_V1, unhealthy=("orders",))
    sick_2 = msgspec.structs.replace(ORDERS_V2, unhealthy=("orders",))
    records = [sick_1, sick_2, MONOLITH, WEB]
    assert catalog(["orders"], records) == catalog(["orders"], BANK)
    assert panicking_services(["orders", "monolith", "nothing"], records) == ["orders"]
    # Offline dataplanes stay out even in panic: no agent, no way to the app.
    gone = msgspec.structs.replace(sick_2, offline=True)
    assert [e.node for e in catalog(["orders"], [sick_1, gone])["orders"]] == ["node-orders-1"]
    assert panicking_services(["orders"], [sick_1, gone]) == ["orders"]
    # One healthy endpoint ends the panic.
    assert [e.node for e in catalog(["orders"], [sick_1, ORDERS_V2])["orders"]] == [
        "node-orders-2", "node-orders-2"
    ]
    assert panicking_services(["orders"], [sick_1, ORDERS_V2]) == []
    # All offline: empty, and no panic (nothing serves it).
    assert catalog(["orders"], [gone]) == {"orders": ()}
    assert panicking_services(["orders"], [gone]) == []


_SERVICES = ("orders", "monolith", "web")


@st.composite
def _meshes(draw: st.DrawFn) -> list[DataplaneRecord]:
    records = []
    for index in range(draw(st.integers(0, 5))):
        served = draw(st.lists(st.sampled_from(_SERVICES), max_size=3))
        records.append(dataplane(
            f"dp-{index}", f"10.0.1.{index}",
            inbounds=[InboundSpec(service=s, port=15000 + n) for n, s in enumerate(served)],
            offline=draw(st.booleans()),
            unhealthy=tuple(sorted(set(draw(st.lists(st.sampled_from(_SERVICES), max_size=3))))),
        ))
    return records


@given(_meshes())
def test_catalog_rules_hold_for_any_mesh(records: list[DataplaneRecord]) -> None:
    found = catalog(_SERVICES, records)
    panicking = panicking_services(_SERVICES, records)
    for service in _SERVICES:
        online = {(r.name, i.port) for r in records if not r.offline
                  for i in decode_spec(r).inbounds if i.service == service}
        healthy = {(r.name, i.port) for r in records if not r.offline
                   and service not in r.unhealthy
                   for i in decode_spec(r).inbounds if i.service == service}
        listed = {(e.node.removeprefix("node-"), e.port) for e in found[service]}
        assert len(listed) == len(found[service])
        assert listed == (healthy or online)
        assert (service in panicking) == bool(online and not healthy)
        assert list(found[service]) == sorted(found[service], key=lambda e: (e.host, e.port, e.node))
    assert catalog(_SERVICES, list(reversed(records))) == found


def test_view_shows_unhealthy_services() -> None:
    sick = msgspec.structs.replace(ORDERS_V1, unhealthy=("orders",))
    view = dataplane_view(sick, now=NOW, latest_version=1)
    assert (view["unhealthy"], view["in_catalog"]) == (["orders"], True)


def test_silent_dataplanes_follow_the_online_rule() -> None:
    records = [
        msgspec.structs.replace(WEB, last_seen=NOW - 30.0),  # exactly three heartbeats: online
        msgspec.structs.replace(ORDERS_V1, last_seen=NOW - 30.5),
        msgspec.structs.replace(ORDERS_V2, last_seen=NOW - 100, offline=True),  # marked already
        msgspec.structs.replace(MONOLITH, last_seen=NOW - 4),
    ]
    assert silent_dataplanes(records, now=NOW) == ["orders-1"]
    assert silent_dataplanes(records, now=NOW, within=online_window(1.0)) == [
        "mono", "orders-1", "web-1"
    ]
    for record in records:
        assert (record.name in silent_dataplanes(records, now=NOW)) == (
            not record.offline and not is_online(record, NOW)
        )


def test_the_config_tells_the_agent_its_heartbeat() -> None:
    assert compile_for(WEB).config.heartbeat_seconds == HEARTBEAT_SECONDS
    mesh = shop()
    config = compile_config(
        mesh, revision=1, policies=[], dataplane=WEB, dataplanes=BANK, heartbeat_seconds=2.5
    ).config
    assert config.heartbeat_seconds == 2.5


@pytest.mark.parametrize("spec", [b"{}", b'{"node_token_id": 5}'])
def test_a_spec_that_is_not_a_dataplane_spec_raises(spec: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode_spec(msgspec.structs.replace(WEB, spec=spec))
