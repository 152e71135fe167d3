"""The agent's side of membership: what is saved on disk, what a config changes, and
the checks on what the central agent sends (pure parts, and the files, no network)."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from meshagent.agent.central import (
    Joined,
    JoinError,
    Status,
    _save_join,
    apply_config,
    certificate_window,
    config_problem,
    join_request,
    load_config,
    load_joined,
    registration,
    save_config,
)
from meshagent.config.agent import AgentConfig
from meshagent.pki.ca import create_ca
from meshagent.pki.csr import CsrRejected, check_issued, make_csr, sign_csr
from meshagent.snapshot.model import (
    Backend,
    Endpoint,
    OutboundListener,
    OutboundRoutes,
    RouteRule,
    Snapshot,
)
from meshagent.snapshot.wire import DataplaneConfig

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def make_config(tmp_path: Path, **overrides: object) -> AgentConfig:
    data: dict[str, object] = {
        "mesh": "shop",
        "node": "vm-1",
        "address": "127.0.0.2",
        "state_dir": str(tmp_path / "state"),
        "central": {"url": "https://central:5681", "ca": "c.pem", "token_file": "t"},
        "inbound": [{"service": "web", "port": 15443, "app_port": 8080, "tags": {"v": "1"}}],
        "outbound": [{"service": "orders", "port": 16001}],
        **overrides,
    }
    return msgspec.convert(data, AgentConfig)


def issue(mesh: str, services: list[str]) -> tuple[str, dict[str, str], dict[str, tuple[bytes, bytes]]]:
    ca = create_ca(mesh, now=NOW)
    keys = {s: make_csr(mesh, s) for s in services}
    certs = {
        s: sign_csr(ca, csr, mesh=mesh, allowed_services=services, now=NOW, ttl=timedelta(hours=24))[1].decode()
        for s, (csr, _) in keys.items()
    }
    return ca.cert_pem.decode(), certs, keys


def joined_for(config: AgentConfig, ca_pem: str) -> Joined:
    return Joined(
        directory=config.central_dir,
        url="https://central:5681",
        mesh="shop",
        dataplane="vm-1",
        identities=config.identities(),
        node_token="ma1_abc_secret",
        ca_bundle=ca_pem,
    )


def test_join_request_names_every_identity_and_listener(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    request = join_request(config, {"web": b"CSR"})
    assert (request.mesh, request.dataplane, request.node, request.address) == (
        "shop", "vm-1", "vm-1", "127.0.0.2",
    )
    assert [(i.service, i.port, i.tags) for i in request.inbounds] == [("web", 15443, {"v": "1"})]
    assert [(o.service, o.source) for o in request.outbounds] == [("orders", "web")]
    assert request.csrs == {"web": "CSR"}


def test_saved_membership_round_trips_with_private_modes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ca_pem, certs, keys = issue("shop", ["web"])
    joined = joined_for(config, ca_pem)
    _save_join(joined, certs, keys)
    loaded = load_joined(config)
    assert loaded is not None
    assert loaded.node_token == "ma1_abc_secret" and loaded.identities == ["web"]
    for name in ("node.token", "web.pem", "joined.json"):
        mode = stat.S_IMODE((config.central_dir / name).stat().st_mode)
        assert mode == 0o600, name
    assert stat.S_IMODE(config.central_dir.stat().st_mode) == 0o700
    pem = (config.central_dir / "web.pem").read_bytes()
    assert b"BEGIN CERTIFICATE" in pem and b"PRIVATE KEY" in pem
    not_before, not_after = certificate_window(loaded)
    assert not_after - not_before == timedelta(hours=24, minutes=5)  # 5 min of clock skew


def test_a_changed_agent_toml_means_joining_again(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ca_pem, certs, keys = issue("shop", ["web"])
    _save_join(joined_for(config, ca_pem), certs, keys)
    renamed = make_config(tmp_path, central={
        "url": "https://central:5681", "ca": "c.pem", "token_file": "t", "dataplane": "other",
    })
    assert load_joined(renamed) is None
    more = make_config(tmp_path, inbound=[
        {"service": "web", "port": 15443, "app_port": 8080},
        {"service": "api", "port": 15444, "app_port": 8081},
    ], outbound=[])
    assert load_joined(more) is None
    assert load_joined(config) is not None
    # Replicas: the one it joined through is still listed, so the membership holds ...
    replicas = make_config(tmp_path, central={
        "url": ["https://central-b:5681", "https://central:5681/"], "ca": "c.pem", "token_file": "t",
    })
    kept = load_joined(replicas)
    assert kept is not None and kept.url == "https://central:5681"
    # ... and a list without it is another central agent: join again.
    other = make_config(tmp_path, central={
        "url": ["https://central-b:5681"], "ca": "c.pem", "token_file": "t",
    })
    assert load_joined(other) is None


def test_no_or_half_saved_membership_means_joining(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    assert load_joined(config) is None
    ca_pem, certs, keys = issue("shop", ["web"])
    _save_join(joined_for(config, ca_pem), certs, keys)
    (config.central_dir / "web.pem").unlink()
    assert load_joined(config) is None


def test_certificates_from_the_central_agent_are_checked_before_use(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ca_pem, certs, keys = issue("shop", ["web"])
    other_ca, _, other_keys = issue("shop", ["web"])
    with pytest.raises(JoinError, match="another key"):
        _save_join(joined_for(config, ca_pem), certs, other_keys)
    with pytest.raises(JoinError, match="not signed by the mesh's CA"):
        _save_join(joined_for(config, other_ca), certs, keys)
    with pytest.raises(JoinError, match="no certificate for web"):
        _save_join(joined_for(config, ca_pem), {}, keys)
    assert not (config.central_dir / "joined.json").exists()


def test_check_issued_refuses_another_identity() -> None:
    ca_pem, certs, keys = issue("shop", ["web", "api"])
    with pytest.raises(CsrRejected, match="names"):
        check_issued(certs["api"].encode(), keys["api"][1], ca_pem.encode(), mesh="shop", service="web")
    not_before, not_after = check_issued(
        certs["web"].encode(), keys["web"][1], ca_pem.encode(), mesh="shop", service="web"
    )
    assert not_before < NOW < not_after


def base_snapshot() -> Snapshot:
    return Snapshot(
        version=3,
        mesh="shop",
        outbounds=(
            OutboundListener(name="o", service="orders", source="web", bind="127.0.0.1", port=1),
        ),
        endpoints={
            "orders": (Endpoint(host="127.0.0.9", port=1, service="orders"),),
            "fixed": (Endpoint(host="127.0.0.8", port=2, service="fixed"),),
        },
    )


def central_config() -> DataplaneConfig:
    rule = RouteRule(route="r", backends=(Backend(service="orders-v2"),))
    return DataplaneConfig(
        version=17,
        mesh="shop",
        mtls="permissive",
        routes={
            "orders": OutboundRoutes(rules=(rule,)),
            "not-mine": OutboundRoutes(rules=(rule,)),
        },
        permissions={"web": ("api",)},
        default_allow=False,
        endpoints={
            "orders-v2": (Endpoint(host="127.0.0.5", port=7, service="orders-v2"),),
            "fixed": (Endpoint(host="127.0.0.6", port=7, service="fixed"),),
        },
    )


def test_apply_config_takes_settings_and_catalog_but_keeps_fixed_endpoints() -> None:
    applied = apply_config(
        base_snapshot(), central_config(), static=frozenset({"fixed"}), catalog=True
    )
    assert applied.version == 4
    assert applied.mtls == "permissive" and applied.default_allow is False
    assert set(applied.routes) == {"orders"}  # only this agent's outbounds
    assert applied.permissions == {"web": ("api",)}
    assert set(applied.endpoints) == {"orders-v2", "fixed"}
    assert applied.endpoints["fixed"][0].host == "127.0.0.8"
    assert not applied.may_call("web", "api") and applied.may_call("api", "web")


def test_apply_config_with_consul_keeps_the_discovered_endpoints() -> None:
    before = base_snapshot()
    applied = apply_config(before, central_config(), static=frozenset(), catalog=False)
    assert applied.endpoints == before.endpoints


def test_config_problems(tmp_path: Path) -> None:
    joined = joined_for(make_config(tmp_path), "")
    assert config_problem(central_config(), joined) == ""
    other = msgspec.structs.replace(central_config(), mesh="billing")
    assert "for mesh 'billing'" in config_problem(other, joined)
    garbage = msgspec.structs.replace(central_config(), ca_bundle="not a pem")
    assert config_problem(garbage, joined) == "ca_bundle is not PEM certificates"


def test_saved_config_round_trips_and_ignores_other_meshes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    joined = joined_for(config, "")
    config.central_dir.mkdir(parents=True)
    assert load_config(joined) is None
    save_config(joined, central_config())
    assert load_config(joined) == central_config()
    save_config(joined, msgspec.structs.replace(central_config(), mesh="billing"))
    assert load_config(joined) is None
    (config.central_dir / "config.json").write_text("{")
    assert load_config(joined) is None


def test_status_report_says_rejected_with_the_reason() -> None:
    status = Status(applied_version=4)
    assert status.report().state == "applied"
    status.update(rejected="bad bundle", cert_not_after=12.0)
    assert status.changed.is_set()
    report = status.report()
    assert (report.state, report.error, report.applied_version, report.cert_not_after) == (
        "rejected", "bad bundle", 4, 12.0,
    )


def test_changed_listeners_with_the_same_identities_are_pending_not_a_new_join(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    ca_pem, certs, keys = issue("shop", ["web"])
    joined = joined_for(config, ca_pem)
    joined.registration = registration(config)
    _save_join(joined, certs, keys)
    same = load_joined(config)
    assert same is not None and same.pending is None
    moved = make_config(tmp_path, address="127.0.0.9", inbound=[
        {"service": "web", "port": 15500, "app_port": 8080}])
    loaded = load_joined(moved)
    assert loaded is not None and loaded.pending == registration(moved)
    assert loaded.pending.address == "127.0.0.9" and loaded.pending.inbounds[0].port == 15500
