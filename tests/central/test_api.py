"""The central agent's admin API, in process: the Starlette app over a real SqliteStore
in tmp_path, driven by httpx through an ASGI transport (no sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshagent.central.api import CentralState, create_app
from meshagent.central.auth import ensure_admin_token
from meshagent.central.store import SqliteStore
from meshagent.pki.ca import create_ca
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes

SHOP_POLICIES = Path(__file__).parents[2] / "examples" / "policies" / "shop.toml"


@dataclass
class Central:
    client: httpx.AsyncClient
    admin: str
    db: Path
    app: Any

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.admin}"}

    async def call(
        self, method: str, path: str, *, token: str | None = None, status: int = 200,
        headers: dict[str, str] | None = None, **kw: Any,
    ) -> Any:
        headers = {**self.auth(token), **(headers or {})}
        response = await self.client.request(method, path, headers=headers, **kw)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        return response.json()

    async def create_mesh(self, name: str, **body: Any) -> Any:
        return await self.call("POST", "/v1/meshes", json={"name": name, **body}, status=201)

    async def scoped_admin(self, *meshes: str) -> str:
        answer = await self.call(
            "POST", "/v1/tokens/admin", json={"meshes": list(meshes)}, status=201
        )
        token: str = answer["token"]
        return token


@pytest.fixture
async def central(tmp_path: Path) -> AsyncIterator[Central]:
    db = tmp_path / "central.db"
    async with await SqliteStore.open(db) as store:
        await ensure_admin_token(store, tmp_path / "admin.token", now=1.0)
        state = CentralState(
            store=store,
            seal_key=key_from_file_bytes(new_key_file_bytes()),
            join_token_ttl_seconds=3600,
            max_body_bytes=64 * 1024,
        )
        app = create_app(state)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://central") as client:
            yield Central(client, (tmp_path / "admin.token").read_text().strip(), db, app)


async def test_create_builtin_mesh_seals_its_ca_key(central: Central) -> None:
    mesh = await central.create_mesh("shop")
    assert mesh["name"] == "shop" and mesh["mtls"] == "strict" and mesh["ca"] == "builtin"
    assert mesh["ca_cert"].startswith("-----BEGIN CERTIFICATE-----")
    listed = await central.call("GET", "/v1/meshes")
    assert [m["name"] for m in listed["meshes"]] == ["shop"]
    assert "ca_cert" not in listed["meshes"][0]
    data = b"".join(p.read_bytes() for p in central.db.parent.glob("central.db*"))
    assert b"PRIVATE KEY" not in data
    assert b"BEGIN CERTIFICATE" in data  # the public part is there, the key is sealed


async def test_create_provided_mesh(central: Central) -> None:
    pair = create_ca("bank", now=datetime.now(UTC))
    mesh = await central.create_mesh(
        "bank", ca="provided", mtls="permissive",
        ca_cert=pair.cert_pem.decode(), ca_key=pair.key_pem.decode(),
    )
    assert mesh["ca"] == "provided" and mesh["ca_cert"] == pair.cert_pem.decode()
    assert mesh["mtls"] == "permissive"
    data = b"".join(p.read_bytes() for p in central.db.parent.glob("central.db*"))
    assert b"PRIVATE KEY" not in data


async def test_provided_ca_of_another_mesh_is_refused(central: Central) -> None:
    other = create_ca("other", now=datetime.now(UTC))
    mine = create_ca("bank", now=datetime.now(UTC))
    answer = await central.call(
        "POST", "/v1/meshes", status=400,
        json={"name": "bank", "ca": "provided", "ca_cert": other.cert_pem.decode(),
              "ca_key": other.key_pem.decode()},
    )
    assert "spiffe://other" in answer["error"]
    answer = await central.call(
        "POST", "/v1/meshes", status=400,
        json={"name": "bank", "ca": "provided", "ca_cert": mine.cert_pem.decode(),
              "ca_key": other.key_pem.decode()},
    )
    assert "does not belong" in answer["error"]
    assert (await central.call("GET", "/v1/meshes"))["meshes"] == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"name": "Shop"}, "invalid mesh name"),
        ({"name": "shop", "mtls": "sometimes"}, "mtls"),
        ({"name": "shop", "colour": "red"}, "unknown key"),
        ({"name": "shop", "ca": "provided"}, "needs both ca_cert and ca_key"),
    ],
)
async def test_bad_mesh_requests_are_400(central: Central, body: dict[str, Any], needle: str) -> None:
    answer = await central.call("POST", "/v1/meshes", json=body, status=400)
    assert needle in answer["error"] and "\n" not in answer["error"]


async def test_duplicate_mesh_is_409(central: Central) -> None:
    await central.create_mesh("shop")
    answer = await central.call("POST", "/v1/meshes", json={"name": "shop"}, status=409)
    assert "already exists" in answer["error"]


async def test_patch_mtls(central: Central) -> None:
    await central.create_mesh("shop")
    mesh = await central.call("PATCH", "/v1/meshes/shop", json={"mtls": "permissive"})
    assert mesh["mtls"] == "permissive" and mesh["version"] == 2
    assert (await central.call("GET", "/v1/meshes/shop"))["mtls"] == "permissive"
    await central.call("PATCH", "/v1/meshes/shop", json={"mtls": "loose"}, status=400)
    await central.call("PATCH", "/v1/meshes/nope", json={"mtls": "off"}, status=404)


async def test_default_allow_at_create_and_by_patch(central: Central) -> None:
    created = await central.create_mesh("shop")
    assert created["default_allow"] is True
    strict = await central.create_mesh("bank", default_allow=False)
    assert strict["default_allow"] is False and strict["mtls"] == "strict"
    opened = await central.call("PATCH", "/v1/meshes/bank", json={"default_allow": True})
    assert (opened["default_allow"], opened["mtls"]) == (True, "strict")
    both = await central.call(
        "PATCH", "/v1/meshes/shop", json={"mtls": "permissive", "default_allow": False}
    )
    assert (both["mtls"], both["default_allow"], both["version"]) == ("permissive", False, 2)
    answer = await central.call("PATCH", "/v1/meshes/shop", json={}, status=400)
    assert "mtls and/or default_allow" in answer["error"]
    await central.call("PATCH", "/v1/meshes/shop", json={"default_allow": "no"}, status=400)
    entries = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]
    assert entries[0]["detail"] == "mtls=permissive default_allow=false"


async def test_apply_valid_policies(central: Central) -> None:
    await central.create_mesh("shop")
    body = SHOP_POLICIES.read_bytes()
    headers = {"Content-Type": "application/toml"}
    answer = await central.call("PUT", "/v1/meshes/shop/policies", content=body, headers=headers)
    assert sorted(answer["created"]) == [
        "Retry/orders-retries", "Timeout/orders-timeouts",
        "TrafficPermission/callers-of-orders", "TrafficRoute/orders-migration",
    ]
    again = await central.call("PUT", "/v1/meshes/shop/policies", content=body, headers=headers)
    assert again["created"] == [] and again["updated"] == [] and len(again["unchanged"]) == 4
    listed = await central.call("GET", "/v1/meshes/shop/policies")
    assert {(p["kind"], p["name"]) for p in listed["policies"]} == {
        ("Retry", "orders-retries"), ("Timeout", "orders-timeouts"),
        ("TrafficPermission", "callers-of-orders"), ("TrafficRoute", "orders-migration"),
    }
    doc = {"TrafficPermission": [{"name": "callers-of-orders", "mesh": "shop",
                                  "sources": ["web"], "destination": "orders"}]}
    changed = await central.call("PUT", "/v1/meshes/shop/policies", json=doc)
    assert changed["updated"] == ["TrafficPermission/callers-of-orders"]


async def test_invalid_policies_change_nothing(central: Central) -> None:
    await central.create_mesh("shop")
    doc = {
        "TrafficPermission": [{"name": "ok", "mesh": "shop", "sources": ["*"], "destination": "a"}],
        "TrafficRoute": [{
            "name": "bad-route", "mesh": "shop", "destination": "monolith",
            "rule": [{"split": [{"service": "orders", "weight": -5}]}],
        }],
    }
    answer = await central.call("PUT", "/v1/meshes/shop/policies", json=doc, status=400)
    assert answer["problems"], answer
    problem = " ".join(answer["problems"])
    assert 'TrafficRoute "bad-route"' in problem and "weight" in problem
    assert (await central.call("GET", "/v1/meshes/shop/policies"))["policies"] == []


async def test_policies_of_another_mesh_are_refused(central: Central) -> None:
    await central.create_mesh("shop")
    doc = {"TrafficPermission": [
        {"name": "mine", "mesh": "shop", "sources": ["*"], "destination": "a"},
        {"name": "theirs", "mesh": "bank", "sources": ["*"], "destination": "a"},
    ]}
    answer = await central.call("PUT", "/v1/meshes/shop/policies", json=doc, status=400)
    assert any('TrafficPermission "theirs": mesh:' in p for p in answer["problems"])
    assert (await central.call("GET", "/v1/meshes/shop/policies"))["policies"] == []


async def test_unknown_content_type_is_415(central: Central) -> None:
    await central.create_mesh("shop")
    response = await central.client.put(
        "/v1/meshes/shop/policies", content=b"kind: x", headers={
            **central.auth(), "Content-Type": "application/yaml"})
    assert response.status_code == 415 and "error" in response.json()


async def test_delete_policy(central: Central) -> None:
    await central.create_mesh("shop")
    await central.call("PUT", "/v1/meshes/shop/policies", content=SHOP_POLICIES.read_bytes(),
                       headers={"Content-Type": "application/toml"})
    await central.call("DELETE", "/v1/meshes/shop/policies/TrafficRoute/orders-migration")
    await central.call("DELETE", "/v1/meshes/shop/policies/TrafficRoute/orders-migration",
                       status=404)
    names = [p["name"] for p in (await central.call("GET", "/v1/meshes/shop/policies"))["policies"]]
    assert "orders-migration" not in names and len(names) == 3


async def test_join_token(central: Central) -> None:
    await central.create_mesh("shop")
    answer = await central.call("POST", "/v1/meshes/shop/tokens",
                                json={"services": ["orders"], "ttl": "10m"}, status=201)
    assert answer["token"].startswith(f"ma1_{answer['id']}_")
    assert answer["uses"] == 1 and answer["services"] == ["orders"]
    # A join token is not an admin token.
    await central.call("GET", "/v1/meshes", token=answer["token"], status=401)
    await central.call("POST", "/v1/meshes/shop/tokens", json={"services": []}, status=400)
    await central.call("POST", "/v1/meshes/shop/tokens",
                       json={"services": ["a"], "uses": 0}, status=400)


async def test_tokens_are_listed_without_secrets_and_revoked_at_once(central: Central) -> None:
    await central.create_mesh("shop")
    await central.create_mesh("bank")
    join = await central.call("POST", "/v1/meshes/shop/tokens",
                              json={"services": ["orders", "web"], "uses": 3}, status=201)
    await central.call("POST", "/v1/meshes/bank/tokens", json={"services": ["ledger"]},
                       status=201)
    scoped = await central.call("POST", "/v1/tokens/admin", json={"meshes": ["shop"]},
                                status=201)
    listed = (await central.call("GET", "/v1/meshes/shop/tokens"))["tokens"]
    assert [(t["id"], t["kind"]) for t in listed] == [(join["id"], "join"), (scoped["id"], "admin")]
    assert listed[0]["services"] == ["orders", "web"] and listed[0]["uses_left"] == 3
    text = json.dumps(listed)
    assert join["token"] not in text and "digest" not in text
    # A mesh-scoped admin sees the join tokens of its mesh, not admin tokens.
    mine = (await central.call("GET", "/v1/meshes/shop/tokens", token=scoped["token"]))["tokens"]
    assert [t["id"] for t in mine] == [join["id"]]
    await central.call("GET", "/v1/meshes/bank/tokens", token=scoped["token"], status=404)
    # Revoked: it can no longer join; revoking twice, or through another mesh, is 404.
    bank_join = (await central.call("GET", "/v1/meshes/bank/tokens"))["tokens"][0]["id"]
    answer = await central.call("DELETE", f"/v1/meshes/shop/tokens/{bank_join}", status=404)
    assert answer["error"] == f"token {bank_join} not found in mesh shop"
    await central.call("DELETE", f"/v1/meshes/shop/tokens/{scoped['id']}",
                       token=scoped["token"], status=404)  # admins revoke admin tokens
    await central.call("DELETE", f"/v1/meshes/shop/tokens/{join['id']}", token=scoped["token"])
    await central.call("DELETE", f"/v1/meshes/shop/tokens/{join['id']}", status=404)
    response = await central.client.post("/v1/join", headers=central.auth(join["token"]),
                                         json={"mesh": "shop", "dataplane": "vm-1"})
    assert response.status_code == 401
    await central.call("DELETE", f"/v1/meshes/shop/tokens/{scoped['id']}")
    await central.call("GET", "/v1/meshes/shop/tokens", token=scoped["token"], status=401)
    entries = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]
    revoked = [e["target"] for e in entries if e["action"] == "token.revoke"]
    assert revoked == [f"token {scoped['id']}", f"token {join['id']}"]


async def test_mesh_scoped_admin_sees_only_its_mesh(central: Central) -> None:
    await central.create_mesh("shop")
    await central.create_mesh("bank")
    shop_admin = await central.scoped_admin("shop")
    listed = await central.call("GET", "/v1/meshes", token=shop_admin)
    assert [m["name"] for m in listed["meshes"]] == ["shop"]
    for method, path, body in [
        ("GET", "/v1/meshes/bank", None),
        ("PATCH", "/v1/meshes/bank", {"mtls": "off"}),
        ("DELETE", "/v1/meshes/bank", None),
        ("GET", "/v1/meshes/bank/policies", None),
        ("POST", "/v1/meshes/bank/tokens", {"services": ["x"]}),
        ("GET", "/v1/meshes/bank/audit", None),
        ("GET", "/v1/meshes/bank/tokens", None),
        ("DELETE", "/v1/meshes/bank/tokens/abc", None),
        ("DELETE", "/v1/meshes/bank/policies/TrafficRoute/x", None),
    ]:
        answer = await central.call(method, path, token=shop_admin, json=body, status=404)
        assert answer["error"] == "mesh bank not found"
    # Its own mesh works; global actions do not.
    await central.call("PATCH", "/v1/meshes/shop", json={"mtls": "off"}, token=shop_admin)
    await central.call("POST", "/v1/meshes/shop/tokens", json={"services": ["x"]},
                       token=shop_admin, status=201)
    await central.call("POST", "/v1/meshes", json={"name": "new"}, token=shop_admin, status=403)
    await central.call("POST", "/v1/tokens/admin", json={"meshes": ["bank"]},
                       token=shop_admin, status=403)


async def test_bad_tokens_are_401(central: Central) -> None:
    for headers in [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer nonsense"},
                    {"Authorization": "Bearer ma1_abc_def"},
                    {"Authorization": central.auth()["Authorization"] + "x"}]:
        response = await central.client.get("/v1/meshes", headers=headers)
        assert response.status_code == 401, headers
        assert set(response.json()) == {"error"}


async def test_body_limit_is_413(central: Central) -> None:
    await central.create_mesh("shop")
    big = b"#" * (65 * 1024)
    answer = await central.call("PUT", "/v1/meshes/shop/policies", content=big, status=413,
                                headers={"Content-Type": "application/toml"})
    assert "at most" in answer["error"]

    # Without Content-Length the body is counted while it is read: a raw ASGI call, as
    # httpx's ASGI transport leaves a streamed request body unclosed when refused early.
    sent: list[dict[str, Any]] = []
    chunk = {"type": "http.request", "body": b"#" * 1024, "more_body": True}

    async def receive() -> dict[str, Any]:
        return chunk

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PUT",
        "scheme": "http", "path": "/v1/meshes/shop/policies", "raw_path": b"/v1/meshes/shop/policies",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("central", 80),
        "headers": [(b"authorization", central.auth()["Authorization"].encode()),
                    (b"content-type", b"application/toml")],
    }
    await central.app(scope, receive, send)
    assert sent[0]["status"] == 413
    assert "over" in json.loads(sent[1]["body"])["error"]


async def test_audit_trail(central: Central) -> None:
    await central.create_mesh("shop")
    await central.call("PATCH", "/v1/meshes/shop", json={"mtls": "permissive"})
    await central.call("PUT", "/v1/meshes/shop/policies", content=SHOP_POLICIES.read_bytes(),
                       headers={"Content-Type": "application/toml"})
    await central.call("DELETE", "/v1/meshes/shop/policies/Retry/orders-retries")
    token = await central.call("POST", "/v1/meshes/shop/tokens", json={"services": ["web"]},
                               status=201)
    entries = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]
    admin_id = central.admin.split("_")[1]
    assert all(e["actor"] == admin_id and e["mesh"] == "shop" for e in entries)
    actions = [(e["action"], e["target"]) for e in reversed(entries)]
    assert actions[0] == ("mesh.create", "mesh shop")
    assert actions[1] == ("mesh.update", "mesh shop")
    assert ("policy.create", "policy TrafficRoute/orders-migration") in actions
    assert ("policy.delete", "policy Retry/orders-retries") in actions
    assert actions[-1] == ("token.create", f"token {token['id']}")
    assert token["token"] not in json.dumps(entries)


async def test_errors_are_json(central: Central) -> None:
    response = await central.client.get("/v1/nothing", headers=central.auth())
    assert response.status_code == 404 and "error" in response.json()
    response = await central.client.post("/v1/meshes", content=b"{not json", headers=central.auth())
    assert response.status_code == 400 and "not JSON" in response.json()["error"]
    response = await central.client.put("/v1/meshes", headers=central.auth())
    assert response.status_code == 405 and "error" in response.json()


async def test_openapi_lists_every_path(central: Central) -> None:
    response = await central.client.get("/v1/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    app_paths = {"/v1/meshes", "/v1/meshes/{mesh}", "/v1/meshes/{mesh}/tokens",
                 "/v1/meshes/{mesh}/tokens/{id}",
                 "/v1/tokens/admin", "/v1/meshes/{mesh}/policies",
                 "/v1/meshes/{mesh}/policies/{kind}/{name}", "/v1/meshes/{mesh}/audit",
                 "/v1/openapi.json", "/v1/meshes/{mesh}/dataplanes",
                 "/v1/meshes/{mesh}/dataplanes/{name}", "/v1/join",
                 "/v1/dataplanes/{mesh}/{name}/certificates",
                 "/v1/dataplanes/{mesh}/{name}/config", "/v1/dataplanes/{mesh}/{name}/status",
                 "/v1/dataplanes/{mesh}/{name}", "/v1/meshes/{mesh}/ca-rotation",
                 "/v1/meshes/{mesh}/ca-rotation/finish"}
    assert set(document["paths"]) == app_paths
    routes = {(route.path, method) for route in central.app.routes for method in route.methods}
    documented = {(path, method.upper()) for path, ops in document["paths"].items() for method in ops}
    assert documented <= routes
    schemas = document["components"]["schemas"]
    assert {"JoinRequest", "JoinResponse", "RenewRequest", "Certificates", "DataplaneConfig",
            "StatusReport", "InboundSpec", "Endpoint"} <= set(schemas)
    refs = [ref for ref in json.dumps(document).split('"$ref": "')[1:]]
    for ref in refs:
        name = ref.split('"')[0].removeprefix("#/components/schemas/")
        assert name in schemas, ref
    join = document["paths"]["/v1/join"]["post"]
    assert join["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("JoinRequest")
    poll = document["paths"]["/v1/dataplanes/{mesh}/{name}/config"]["get"]
    assert {p["name"] for p in poll["parameters"]} == {"mesh", "name", "after", "wait"}


# ---------------------------------------------------------------------------- config, TLS, storage


def test_examples_central_toml_is_valid() -> None:
    from meshagent.config.central import load_central

    config = load_central(Path(__file__).parents[2] / "examples" / "central.toml")
    assert config.listen == "127.0.0.1:5681"
    assert float(config.cert_ttl) == 24 * 3600.0 and float(config.join_token_ttl) == 3600.0
    assert config.store.kind == "sqlite"


def test_central_config_defaults_and_problems(tmp_path: Path) -> None:
    from meshagent.config.central import CentralConfig, validate_central
    from meshagent.config.load import ConfigError, load_toml

    path = tmp_path / "central.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n')
    config = load_toml(path, CentralConfig)
    assert config.seal_key_path == tmp_path / "seal.key"
    assert config.store_path == tmp_path / "central.db"
    path.write_text(f'data_dir = "{tmp_path}"\nlisten = "example.com:80"\njoin_token_ttl = "0s"\n')
    problems = validate_central(load_toml(path, CentralConfig))
    assert [p.split(":")[0] for p in problems] == ["listen", "join_token_ttl"]
    path.write_text(f'data_dir = "{tmp_path}"\n[store]\nkind = "etcd"\n')
    with pytest.raises(ConfigError, match=r"store\.kind"):
        load_toml(path, CentralConfig)


def test_server_certificate_names_the_listen_address(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509

    from meshagent.central.tls import ensure_central_tls

    first = ensure_central_tls(tmp_path, "10.1.2.3", now=datetime.now(UTC))
    assert first.created_ca
    assert (tmp_path / "central-ca-key.pem").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) >= {
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("127.0.0.1")
    }
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    # Reused as is; a new listen address gets a new server certificate from the same CA.
    ca = first.ca_cert.read_bytes()
    server = first.server_cert.read_bytes()
    again = ensure_central_tls(tmp_path, "10.1.2.3", now=datetime.now(UTC))
    assert not again.created_ca and again.server_cert.read_bytes() == server
    moved = ensure_central_tls(tmp_path, "10.9.9.9", now=datetime.now(UTC))
    assert moved.ca_cert.read_bytes() == ca and moved.server_cert.read_bytes() != server


def test_server_names_go_into_the_certificate_and_out_again(tmp_path: Path) -> None:
    import ipaddress

    from cryptography import x509

    from meshagent.central.tls import ensure_central_tls

    def san_of(path: Path) -> x509.SubjectAlternativeName:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    now = datetime.now(UTC)
    named = ensure_central_tls(tmp_path, "10.1.2.3", now=now,
                               server_names=["central.example.com", "10.0.0.100", "localhost"])
    san = san_of(named.server_cert)
    assert san.get_values_for_type(x509.DNSName) == ["central.example.com", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(a) for a in ("10.1.2.3", "10.0.0.100", "127.0.0.1", "::1")
    ]
    server = named.server_cert.read_bytes()
    same = ensure_central_tls(tmp_path, "10.1.2.3", now=now,
                              server_names=["central.example.com", "10.0.0.100"])
    assert same.server_cert.read_bytes() == server  # same names: kept
    # A name taken out of central.toml leaves the certificate at the next start.
    fewer = ensure_central_tls(tmp_path, "10.1.2.3", now=now, server_names=["10.0.0.100"])
    assert fewer.server_cert.read_bytes() != server
    assert "central.example.com" not in san_of(fewer.server_cert).get_values_for_type(x509.DNSName)


async def test_stored_policies_read_back_as_documents(central: Central) -> None:
    from meshagent.policy.load import load_document, load_paths

    await central.create_mesh("shop")
    await central.call("PUT", "/v1/meshes/shop/policies", content=SHOP_POLICIES.read_bytes(),
                       headers={"Content-Type": "application/toml"})
    policies = (await central.call("GET", "/v1/meshes/shop/policies"))["policies"]
    document: dict[str, list[Any]] = {}
    for policy in policies:
        document.setdefault(policy["kind"], []).append(policy["spec"])
    resources = load_document(json.dumps(document).encode(), source="stored.json")
    assert sorted(resources, key=repr) == sorted(load_paths([SHOP_POLICIES]), key=repr)


async def test_run_central_serves_tls_and_stops(tmp_path: Path) -> None:
    import ssl

    import trio

    from meshagent.central.main import run_central
    from meshagent.config.central import CentralConfig
    from meshagent.demo.ports import free_port

    config = CentralConfig(listen=f"127.0.0.1:{free_port()}", data_dir=str(tmp_path / "data"))
    said: list[str] = []
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                lambda task_status: run_central(
                    config, say=said.append, handle_signals=False, stop=stop,
                    task_status=task_status,
                )
            )
            context = ssl.create_default_context(cafile=str(tmp_path / "data" / "central-ca.pem"))
            token = (tmp_path / "data" / "admin.token").read_text().strip()
            async with httpx.AsyncClient(verify=context, base_url=url) as client:
                response = await client.get(
                    "/v1/meshes", headers={"Authorization": f"Bearer {token}"}
                )
                assert response.status_code == 200 and response.json() == {"meshes": []}
                assert (await client.get("/v1/meshes")).status_code == 401
            stop.set()
    assert len(said) == 1 and "admin.token" in said[0] and "central-ca.pem" in said[0]
    assert (tmp_path / "data" / "seal.key").stat().st_mode & 0o777 == 0o600
    assert len((tmp_path / "data" / "seal.key").read_bytes()) == 32
