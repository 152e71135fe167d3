"""The dataplane API, in process: the Starlette app over a real SqliteStore in tmp_path,
driven by httpx through an ASGI transport, with real keys, CSRs and certificates and an
injected clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing
from cryptography import x509

from meshagent.central.api import create_app
from meshagent.central.auth import ensure_admin_token
from meshagent.central.dataplane_api import MAX_ERROR_CHARS, reported_unhealthy
from meshagent.central.dataplanes import new_dataplane
from meshagent.central.main import READ_TIMEOUT_SECONDS, hypercorn_config
from meshagent.central.store import PolicyRecord, SqliteStore, Store
from meshagent.central.tls import CentralTls
from meshagent.central.web import CentralState
from meshagent.config.central import CentralConfig
from meshagent.pki.ca import uri_sans
from meshagent.pki.csr import make_csr
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes
from meshagent.snapshot.model import Backend, Endpoint
from meshagent.snapshot.wire import (
    MAX_WAIT_SECONDS,
    DataplaneConfig,
    InboundSpec,
    JoinRequest,
    OutboundSpec,
)

CERT_TTL_SECONDS = 2 * 3600.0

ROUTES = """
[[TrafficRoute]]
name = "orders-canary"
mesh = "shop"
destination = "orders"
  [TrafficRoute.default]
  split = [ { service = "orders", weight = 80, tags = { version = "v1" } },
            { service = "orders", weight = 20, tags = { version = "v2" } } ]

[[TrafficPermission]]
name = "callers-of-orders"
mesh = "shop"
sources = ["web"]
destination = "orders"
"""

WEB_CALLERS = """
[[TrafficPermission]]
name = "callers-of-web"
mesh = "shop"
sources = ["gateway"]
destination = "web"
"""


@dataclass
class Clock:
    now: float = field(default_factory=time.time)

    def __call__(self) -> float:
        return self.now


@dataclass
class Central:
    client: httpx.AsyncClient
    admin: str
    store: Store
    clock: Clock
    app: Any

    async def call(
        self, method: str, path: str, *, token: str | None = None, status: int = 200,
        headers: dict[str, str] | None = None, **kw: Any,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token or self.admin}", **(headers or {})}
        response = await self.client.request(method, path, headers=headers, **kw)
        assert response.status_code == status, response.text
        if status == 204:
            assert response.content == b""
            return None
        assert response.headers["content-type"].startswith("application/json")
        answer = response.json()
        if status >= 400:
            assert set(answer) == {"error"} and "\n" not in answer["error"], answer
        return answer

    async def mesh(self, name: str, **body: Any) -> Any:
        return await self.call("POST", "/v1/meshes", json={"name": name, **body}, status=201)

    async def join_token(self, mesh: str, *services: str, uses: int = 1, ttl: str = "1h") -> str:
        answer = await self.call(
            "POST", f"/v1/meshes/{mesh}/tokens", status=201,
            json={"services": list(services), "uses": uses, "ttl": ttl},
        )
        token: str = answer["token"]
        return token

    async def apply(self, mesh: str, document: str) -> Any:
        return await self.call(
            "PUT", f"/v1/meshes/{mesh}/policies", content=document.encode(),
            headers={"Content-Type": "application/toml"},
        )

    async def dataplanes(self, mesh: str, token: str | None = None) -> dict[str, Any]:
        answer = await self.call("GET", f"/v1/meshes/{mesh}/dataplanes", token=token)
        return {d["name"]: d for d in answer["dataplanes"]}


@pytest.fixture
async def central(tmp_path: Path) -> AsyncIterator[Central]:
    clock = Clock()
    async with await SqliteStore.open(tmp_path / "central.db") as store:
        await ensure_admin_token(store, tmp_path / "admin.token", now=clock())
        state = CentralState(
            store=store,
            seal_key=key_from_file_bytes(new_key_file_bytes()),
            join_token_ttl_seconds=3600,
            max_body_bytes=64 * 1024,
            clock=clock,
            cert_ttl_seconds=CERT_TTL_SECONDS,
        )
        app = create_app(state)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://central") as client:
            admin = (tmp_path / "admin.token").read_text().strip()
            yield Central(client, admin, store, clock, app)


@dataclass
class Agent:
    """One host's side of a join: its keys (kept here) and its request."""

    request: JoinRequest
    keys: dict[str, bytes]

    def body(self) -> Any:
        return msgspec.to_builtins(self.request)


def agent(
    name: str = "vm-1",
    *,
    mesh: str = "shop",
    address: str = "10.0.0.1",
    inbounds: list[InboundSpec] | None = None,
    outbounds: list[OutboundSpec] | None = None,
    csr_mesh: str | None = None,
) -> Agent:
    if inbounds is None:
        inbounds = [InboundSpec(service="web", port=15443, protocol="http", tags={"version": "v1"})]
    outbounds = outbounds or []
    services = sorted({i.service for i in inbounds} | {o.source for o in outbounds})
    pairs = {s: make_csr(csr_mesh or mesh, s) for s in services}
    request = JoinRequest(
        mesh=mesh, dataplane=name, node=f"node-{name}", address=address,
        inbounds=inbounds, outbounds=outbounds,
        csrs={s: csr.decode() for s, (csr, _) in pairs.items()},
    )
    return Agent(request, {s: key for s, (_, key) in pairs.items()})


async def join(central: Central, token: str, host: Agent, status: int = 201) -> Any:
    return await central.call("POST", "/v1/join", token=token, json=host.body(), status=status)


def check_certificates(answer: dict[str, Any], ca_pem: str, mesh: str, services: list[str]) -> None:
    ca = x509.load_pem_x509_certificate(ca_pem.encode())
    assert sorted(answer["certificates"]) == services
    for service, pem in answer["certificates"].items():
        cert = x509.load_pem_x509_certificate(pem.encode())
        cert.verify_directly_issued_by(ca)
        assert uri_sans(cert) == [f"spiffe://{mesh}/service/{service}"]


async def token_left(central: Central, token: str) -> int | None:
    record = await central.store.get_token(token.split("_")[1])
    return record.uses_left


# ---------------------------------------------------------------------------- join


async def test_join_issues_certificates_and_a_node_credential(central: Central) -> None:
    mesh = await central.mesh("shop")
    token = await central.join_token("shop", "web", "orders")
    host = agent(outbounds=[OutboundSpec(service="orders", port=16001, source="web")])
    answer = await join(central, token, host)
    assert (answer["mesh"], answer["dataplane"]) == ("shop", "vm-1")
    assert answer["ca_bundle"] == mesh["ca_cert"]
    check_certificates(answer, mesh["ca_cert"], "shop", ["web"])
    cert = x509.load_pem_x509_certificate(answer["certificates"]["web"].encode())
    assert abs(cert.not_valid_after_utc.timestamp() - (central.clock() + CERT_TTL_SECONDS)) < 2
    # The node credential is a new token of the mesh, allowed the join token's services.
    node_id = answer["node_token"].split("_")[1]
    node = await central.store.get_token(node_id)
    assert (node.kind, node.mesh, node.services, node.expires_at, node.uses_left) == (
        "node", "shop", ("orders", "web"), None, None
    )
    listed = (await central.dataplanes("shop"))["vm-1"]
    assert listed["node"] == "node-vm-1" and listed["address"] == "10.0.0.1"
    assert listed["services"] == ["web"] and listed["online"] is True
    assert listed["cert_not_after"] == cert.not_valid_after_utc.timestamp()
    assert listed["node_token_id"] == node_id and listed["applied_version"] == 0
    assert listed["outbounds"] == [
        {"service": "orders", "port": 16001, "protocol": "tcp", "source": "web"}
    ]
    entry = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"][0]
    assert (entry["action"], entry["actor"], entry["target"]) == (
        "dataplane.join", token.split("_")[1], "dataplane vm-1"
    )
    assert answer["node_token"] not in str(entry) and token not in str(entry)


async def test_a_one_use_token_joins_once(central: Central) -> None:
    await central.mesh("shop")
    token = await central.join_token("shop", "web")
    await join(central, token, agent("vm-1"))
    again = await join(central, token, agent("vm-2"), status=401)
    assert "unknown join token" in again["error"] and "used up" in again["error"]
    assert list(await central.dataplanes("shop")) == ["vm-1"]


async def test_concurrent_joins_on_a_one_use_token_one_wins(central: Central) -> None:
    await central.mesh("shop")
    token = await central.join_token("shop", "web")
    statuses: list[int] = []

    async def attempt(name: str) -> None:
        response = await central.client.post(
            "/v1/join", headers={"Authorization": f"Bearer {token}"}, json=agent(name).body()
        )
        statuses.append(response.status_code)
        if response.status_code != 201:
            assert "join token" in response.json()["error"]

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(6):
                nursery.start_soon(attempt, f"vm-{i}")
    assert sorted(statuses) == [201] + [401] * 5
    assert len(await central.dataplanes("shop")) == 1
    assert [t.kind for t in await central.store.list_tokens("shop")] == ["node"]


async def test_a_token_of_one_mesh_cannot_join_another(central: Central) -> None:
    await central.mesh("shop")
    await central.mesh("bank")
    token = await central.join_token("shop", "web")
    refused = await join(central, token, agent(mesh="bank"), status=403)
    assert refused["error"] == "mesh: this join token is not valid for mesh bank"
    # Not even a mesh that does not exist tells it apart.
    refused = await join(central, token, agent(mesh="nowhere"), status=403)
    assert refused["error"] == "mesh: this join token is not valid for mesh nowhere"
    assert await token_left(central, token) == 1
    assert await central.dataplanes("bank") == {}
    await join(central, token, agent())  # still good for its own mesh


async def test_a_csr_for_a_service_outside_the_token_is_refused_and_nothing_changes(
    central: Central,
) -> None:
    await central.mesh("shop")
    token = await central.join_token("shop", "web")
    outside = agent(inbounds=[InboundSpec(service="payments", port=15443)])
    refused = await join(central, token, outside, status=403)
    assert refused["error"] == (
        "inbounds[0].service: this join token does not allow service 'payments' (it allows: web)"
    )
    assert await token_left(central, token) == 1
    assert await central.dataplanes("shop") == {}
    assert [t.kind for t in await central.store.list_tokens("shop")] == ["join"]


@pytest.mark.parametrize(
    ("mangle", "status", "needle"),
    [
        (lambda b: {**b, "address": "vm-1.example"}, 400, "address: 'vm-1.example'"),
        (lambda b: {**b, "dataplane": "VM 1"}, 400, "dataplane: 'VM 1'"),
        (lambda b: {**b, "csrs": {}}, 400, "csrs: no CSR for web"),
        (lambda b: {**b, "csrs": {"web": "garbage"}}, 400, "csrs.web: not a PEM"),
        (lambda b: {**b, "inbounds": [{"service": "web", "port": 0}]}, 400, "inbounds[0].port: 0"),
        (lambda b: {**b, "inbounds": [{"service": "web", "port": "x"}]}, 400, "inbounds[0].port"),
        (lambda b: {k: v for k, v in b.items() if k != "node"}, 400, "node"),
        (lambda b: [b], 400, "request body"),
    ],
)
async def test_a_malformed_join_does_not_burn_the_token(
    central: Central, mangle: Any, status: int, needle: str
) -> None:
    await central.mesh("shop")
    token = await central.join_token("shop", "web")
    response = await central.client.post(
        "/v1/join", headers={"Authorization": f"Bearer {token}"}, json=mangle(agent().body())
    )
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]
    assert await token_left(central, token) == 1
    await join(central, token, agent())


async def test_join_bodies_are_bounded_and_json(central: Central) -> None:
    await central.mesh("shop")
    token = await central.join_token("shop", "web")
    headers = {"Authorization": f"Bearer {token}"}
    big = await central.client.post("/v1/join", headers=headers, content=b"x" * (65 * 1024))
    assert big.status_code == 413
    bad = await central.client.post("/v1/join", headers=headers, content=b"{nope")
    assert bad.status_code == 400 and "not JSON" in bad.json()["error"]
    toml = await central.client.post(
        "/v1/join", headers={**headers, "Content-Type": "application/toml"}, content=b"x = 1"
    )
    assert toml.status_code == 415
    assert await token_left(central, token) == 1


async def test_join_needs_an_unexpired_join_token(central: Central) -> None:
    await central.mesh("shop")
    token = await central.join_token("shop", "web", ttl="10m")
    central.clock.now += 601
    expired = await join(central, token, agent(), status=401)
    assert expired["error"] == "this join token has expired; ask an admin for a new one"
    refused = await join(central, central.admin, agent(), status=401)
    assert refused["error"] == "this token is not a join token"
    missing = await central.client.post("/v1/join", json=agent().body())
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"


async def test_joining_again_replaces_the_dataplane_and_its_credential(central: Central) -> None:
    await central.mesh("shop")
    token = await central.join_token("shop", "web", uses=2)
    first = await join(central, token, agent(address="10.0.0.1"))
    second = await join(central, token, agent(address="10.0.0.2"))
    listed = await central.dataplanes("shop")
    assert listed["vm-1"]["address"] == "10.0.0.2"
    path = "/v1/dataplanes/shop/vm-1/config?wait=0"
    stale = await central.call("GET", path, token=first["node_token"], status=401)
    assert stale["error"] == "unknown token"  # the old credential was deleted
    await central.call("GET", path, token=second["node_token"])
    assert len(await central.store.list_tokens("shop")) == 1  # the join token is used up


async def test_a_join_token_cannot_take_over_another_services_dataplane(central: Central) -> None:
    await central.mesh("shop")
    payments = agent("vm-1", inbounds=[InboundSpec(service="payments", port=15443)])
    await join(central, await central.join_token("shop", "payments"), payments)
    web_token = await central.join_token("shop", "web")
    refused = await join(central, web_token, agent("vm-1"), status=403)
    assert refused["error"] == (
        "dataplane: vm-1 exists with services this join token does not allow (payments); "
        "delete it first or join under another name"
    )
    assert await token_left(central, web_token) == 1
    assert (await central.dataplanes("shop"))["vm-1"]["services"] == ["payments"]


# ---------------------------------------------------------------------------- node credentials


async def joined(central: Central, host: Agent, *services: str) -> str:
    token = await central.join_token(host.request.mesh, *(services or ("web",)))
    answer = await join(central, token, host)
    node_token: str = answer["node_token"]
    return node_token


async def test_renewal_signs_new_keys_with_the_node_credential(central: Central) -> None:
    mesh = await central.mesh("shop")
    node = await joined(central, agent(), "web", "orders")
    central.clock.now += 3600
    csr, _ = make_csr("shop", "web")
    answer = await central.call(
        "POST", "/v1/dataplanes/shop/vm-1/certificates", token=node,
        json={"csrs": {"web": csr.decode()}},
    )
    check_certificates(answer, mesh["ca_cert"], "shop", ["web"])
    assert answer["ca_bundle"] == mesh["ca_cert"]
    listed = (await central.dataplanes("shop"))["vm-1"]
    assert listed["last_seen"] == central.clock.now
    assert abs(listed["cert_not_after"] - (central.clock.now + CERT_TTL_SECONDS)) < 2
    # Services within the credential (the join token's) only.
    other, _ = make_csr("shop", "payments")
    refused = await central.call(
        "POST", "/v1/dataplanes/shop/vm-1/certificates", token=node, status=403,
        json={"csrs": {"payments": other.decode()}},
    )
    assert refused["error"].startswith(
        "csrs.payments: this node credential does not allow service 'payments'"
    )
    await central.call(
        "POST", "/v1/dataplanes/shop/vm-1/certificates", token=node, status=400,
        json={"csrs": {}},
    )
    actions = [e["action"] for e in (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]]
    assert actions[0] == "dataplane.renew"


async def test_a_node_credential_acts_only_for_its_dataplane(central: Central) -> None:
    await central.mesh("shop")
    await central.mesh("bank")
    x = await joined(central, agent("vm-x"))
    await joined(central, agent("vm-y"))
    await joined(central, agent("vm-b", mesh="bank"))
    csr, _ = make_csr("shop", "web")
    calls = [
        ("GET", "config?wait=0", None),
        ("PUT", "status", {"applied_version": 1}),
        ("POST", "certificates", {"csrs": {"web": csr.decode()}}),
    ]
    for method, tail, body in calls:
        for mesh, name in [("shop", "vm-y"), ("bank", "vm-b"), ("shop", "ghost"), ("nope", "vm-x")]:
            refused = await central.call(
                method, f"/v1/dataplanes/{mesh}/{name}/{tail}", token=x, json=body, status=401
            )
            assert refused["error"] == (
                f"this node credential is not valid for dataplane {name} in mesh {mesh}"
            )
    # Neither admin nor join tokens are node credentials.
    join_token = await central.join_token("shop", "web")
    for token in (central.admin, join_token):
        refused = await central.call(
            "GET", "/v1/dataplanes/shop/vm-x/config?wait=0", token=token, status=401
        )
        assert refused["error"] == "this token is not a node credential"
    # Node credentials are not admin tokens either.
    await central.call("GET", "/v1/meshes", token=x, status=401)


# ---------------------------------------------------------------------------- config


def poll(node: str, after: int, wait: float = 0) -> tuple[str, str, dict[str, Any]]:
    return "GET", f"/v1/dataplanes/shop/vm-1/config?after={after}&wait={wait:g}", {"token": node}


async def test_config_long_poll(central: Central) -> None:
    await central.mesh("shop")
    node = await joined(central, agent())
    first = await central.call("GET", "/v1/dataplanes/shop/vm-1/config?wait=0", token=node)
    version = first["version"]
    assert version == await central.store.mesh_revision("shop") and version > 0
    # A version other than the current one answers at once, even with a long wait.
    with trio.fail_after(2):
        method, path, kw = poll(node, after=version - 1, wait=60)
        assert (await central.call(method, path, **kw))["version"] == version
    # The current version waits, up to ``wait``.
    started = trio.current_time()
    method, path, kw = poll(node, after=version, wait=0.3)
    assert (await central.call(method, path, **kw))["version"] == version
    assert trio.current_time() - started >= 0.29
    # ... and wakes when a policy is applied.
    answers: list[Any] = []

    async def wait_for_change(after: int) -> None:
        method, path, kw = poll(node, after=after, wait=30)
        answers.append(await central.call(method, path, **kw))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_change, version)
            await trio.sleep(0.2)
            assert answers == []
            await central.apply("shop", WEB_CALLERS)
    [changed] = answers
    assert changed["version"] > version
    assert changed["permissions"] == {"web": ["gateway"]}
    # Heartbeats do not wake a long poll.
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_for_change, changed["version"])
            await trio.sleep(0.1)
            await central.call(
                "PUT", "/v1/dataplanes/shop/vm-1/status", token=node, status=204,
                json={"applied_version": changed["version"]},
            )
            await trio.sleep(0.2)
            assert len(answers) == 1
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "query",
    ["after=-1", "after=x", "after=1.5", "after=%C2%B2", "after=" + "9" * 40, "wait=61", "wait=-1",
     "wait=nan", "wait=abc", "wait=inf"],
)
async def test_bad_poll_parameters_are_400(central: Central, query: str) -> None:
    await central.mesh("shop")
    node = await joined(central, agent())
    refused = await central.call(
        "GET", f"/v1/dataplanes/shop/vm-1/config?{query}", token=node, status=400
    )
    assert refused["error"].startswith(query.split("=")[0] + ": ")


async def test_compiled_config_of_a_dataplane(central: Central) -> None:
    mesh = await central.mesh("shop", mtls="permissive", default_allow=False)
    web_node = await joined(
        central,
        agent("web-1", address="10.0.0.1",
              outbounds=[OutboundSpec(service="orders", port=16001, source="web")]),
        "web",
    )
    for name, address, version in [("orders-1", "10.0.0.2", "v1"), ("orders-2", "10.0.0.3", "v2")]:
        inbound = InboundSpec(service="orders", port=15443, tags={"version": version})
        await joined(central, agent(name, address=address, inbounds=[inbound]), "orders")
    await central.apply("shop", ROUTES)
    answer = await central.call("GET", "/v1/dataplanes/shop/web-1/config?wait=0", token=web_node)
    config = msgspec.convert(answer, DataplaneConfig)
    assert config.version == await central.store.mesh_revision("shop")
    assert (config.mesh, config.mtls, config.default_allow) == ("shop", "permissive", False)
    assert config.ca_bundle == mesh["ca_cert"]
    assert config.routes["orders"].rules[0].backends == (
        Backend(service="orders", tags=(("version", "v1"),), weight=80),
        Backend(service="orders", tags=(("version", "v2"),), weight=20),
    )
    assert config.permissions == {}  # nobody names web; default_allow=false denies
    assert config.endpoints == {
        "orders": (
            Endpoint(host="10.0.0.2", port=15443, service="orders", node="node-orders-1",
                     tags=(("version", "v1"),)),
            Endpoint(host="10.0.0.3", port=15443, service="orders", node="node-orders-2",
                     tags=(("version", "v2"),)),
        )
    }
    orders_view = (await central.dataplanes("shop"))["orders-1"]
    assert orders_view["latest_version"] == config.version


async def test_a_stored_policy_that_no_longer_decodes_is_left_out(
    central: Central, capsys: pytest.CaptureFixture[str]
) -> None:
    await central.mesh("shop")
    node = await joined(central, agent(outbounds=[OutboundSpec(service="orders", port=1, source="web")]))
    await central.apply("shop", ROUTES)
    await central.store.put_policy(
        PolicyRecord(mesh="shop", kind="TrafficRoute", name="from-the-future", updated_at=1.0,
                     spec=b'{"name": "from-the-future", "mesh": "shop", "destination": "orders",'
                          b' "mirror": "orders-shadow"}')
    )
    for _ in range(2):
        answer = await central.call("GET", "/v1/dataplanes/shop/vm-1/config?wait=0", token=node)
        assert answer["routes"]["orders"]["rules"][0]["route"] == "orders-canary"
    logged = [line for line in capsys.readouterr().err.splitlines() if "from-the-future" in line]
    assert len(logged) == 1 and "stored policy left out" in logged[0]


async def test_a_deleted_dataplane_loses_its_long_poll(central: Central) -> None:
    await central.mesh("shop")
    node = await joined(central, agent())
    version = await central.store.mesh_revision("shop")
    answers: list[Any] = []

    async def wait() -> None:
        method, path, kw = poll(node, after=version, wait=30)
        answers.append(await central.call(method, path, status=401, **kw))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait)
            await trio.sleep(0.1)
            await central.call("DELETE", "/v1/meshes/shop/dataplanes/vm-1")
    assert answers[0]["error"] == "this node credential is not valid for dataplane vm-1 in mesh shop"


def test_the_server_keeps_a_long_poll_open() -> None:
    config = msgspec.convert({"data_dir": "/tmp/x"}, CentralConfig)
    assert READ_TIMEOUT_SECONDS > MAX_WAIT_SECONDS
    tls = CentralTls(ca_cert=Path("ca.pem"), server_cert=Path("s.pem"), server_key=Path("k.pem"),
                     created_ca=False)
    assert hypercorn_config(config, tls).read_timeout == READ_TIMEOUT_SECONDS


# ---------------------------------------------------------------------------- status and the list


async def test_status_heartbeats_show_in_the_list(central: Central) -> None:
    await central.mesh("shop")
    node = await joined(central, agent())
    status = "/v1/dataplanes/shop/vm-1/status"
    version = await central.store.mesh_revision("shop")
    central.clock.now += 100
    assert (await central.dataplanes("shop"))["vm-1"]["online"] is False
    await central.call(
        "PUT", status, token=node, status=204,
        json={"applied_version": version, "cert_not_after": 1_900_000_000.0},
    )
    view = (await central.dataplanes("shop"))["vm-1"]
    assert (view["online"], view["applied_version"], view["latest_version"]) == (True, version, version)
    assert (view["last_seen"], view["cert_not_after"], view["last_error"]) == (
        central.clock.now, 1_900_000_000.0, ""
    )
    central.clock.now += 30
    assert (await central.dataplanes("shop"))["vm-1"]["online"] is True
    central.clock.now += 1
    assert (await central.dataplanes("shop"))["vm-1"]["online"] is False
    # A heartbeat without cert_not_after keeps the one known.
    await central.call("PUT", status, token=node, status=204, json={"applied_version": version})
    assert (await central.dataplanes("shop"))["vm-1"]["cert_not_after"] == 1_900_000_000.0
    await central.call("PUT", status, token=node, status=400, json={"applied_version": -1})
    await central.call("PUT", status, token=node, status=400, json={"state": "applied"})
    await central.call(
        "PUT", status, token=node, status=400, json={"applied_version": 1, "state": "maybe"}
    )


async def test_a_rejected_config_stays_visible_until_one_applies(
    central: Central, capsys: pytest.CaptureFixture[str]
) -> None:
    await central.mesh("shop")
    node = await joined(central, agent())
    status = "/v1/dataplanes/shop/vm-1/status"
    rejected = {"applied_version": 3, "state": "rejected", "error": "route orders:\n  no such\tport"}
    for _ in range(3):
        await central.call("PUT", status, token=node, status=204, json=rejected)
    view = (await central.dataplanes("shop"))["vm-1"]
    assert view["last_error"] == "route orders: no such port" and view["applied_version"] == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if "rejected its config" in line]
    assert len(warnings) == 1 and "no such port" in warnings[0]  # once per new error
    long = {"applied_version": 3, "state": "rejected", "error": "x" * 5000}
    await central.call("PUT", status, token=node, status=204, json=long)
    assert len((await central.dataplanes("shop"))["vm-1"]["last_error"]) == MAX_ERROR_CHARS
    await central.call("PUT", status, token=node, status=204, json={"applied_version": 4})
    assert (await central.dataplanes("shop"))["vm-1"]["last_error"] == ""


async def test_heartbeats_do_not_change_the_mesh_revision(central: Central) -> None:
    await central.mesh("shop")
    node = await joined(central, agent())
    before = await central.store.mesh_revision("shop")
    await central.call(
        "PUT", "/v1/dataplanes/shop/vm-1/status", token=node, status=204,
        json={"applied_version": before},
    )
    assert await central.store.mesh_revision("shop") == before


async def test_mesh_scoped_admins_see_only_their_meshes_dataplanes(central: Central) -> None:
    await central.mesh("shop")
    await central.mesh("bank")
    await joined(central, agent("vault", mesh="bank"))
    shop_admin = (await central.call(
        "POST", "/v1/tokens/admin", json={"meshes": ["shop"]}, status=201
    ))["token"]
    assert await central.dataplanes("shop", token=shop_admin) == {}
    for method, path in [("GET", "/v1/meshes/bank/dataplanes"),
                         ("DELETE", "/v1/meshes/bank/dataplanes/vault")]:
        refused = await central.call(method, path, token=shop_admin, status=404)
        assert refused["error"] == "mesh bank not found"
    assert list(await central.dataplanes("bank")) == ["vault"]


async def test_deleting_a_dataplane_deletes_its_credential(central: Central) -> None:
    await central.mesh("shop")
    node = await joined(central, agent())
    deleted = await central.call("DELETE", "/v1/meshes/shop/dataplanes/vm-1")
    assert deleted == {"deleted": "dataplane vm-1", "mesh": "shop"}
    assert await central.dataplanes("shop") == {}
    assert await central.store.list_tokens("shop") == []
    await central.call("GET", "/v1/dataplanes/shop/vm-1/config?wait=0", token=node, status=401)
    missing = await central.call("DELETE", "/v1/meshes/shop/dataplanes/vm-1", status=404)
    assert missing["error"] == "dataplane vm-1 in mesh shop not found"
    entry = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"][0]
    assert (entry["action"], entry["target"]) == ("dataplane.delete", "dataplane vm-1")


# ---------------------------------------------------------------------------- update


async def test_an_update_changes_listeners_and_wakes_the_mesh(central: Central) -> None:
    await central.mesh("shop")
    orders = await joined(central, agent("orders-1", address="10.0.0.2", inbounds=[
        InboundSpec(service="orders", port=15443, tags={"version": "v1"})]), "orders")
    web = await joined(central, agent("web-1", inbounds=[], outbounds=[
        OutboundSpec(service="orders", port=16001, source="web")]), "web")
    before = await central.store.mesh_revision("shop")
    update = {
        "node": "node-orders-1", "address": "10.0.0.9",
        "inbounds": [{"service": "orders", "port": 15500, "tags": {"version": "v2"}}],
    }
    await central.call("PUT", "/v1/dataplanes/shop/orders-1", token=orders, json=update,
                       status=204)
    assert await central.store.mesh_revision("shop") == before + 1
    answer = await central.call("GET", "/v1/dataplanes/shop/web-1/config?wait=0", token=web)
    config = msgspec.convert(answer, DataplaneConfig)
    assert config.endpoints["orders"] == (
        Endpoint(host="10.0.0.9", port=15500, service="orders", node="node-orders-1",
                 tags=(("version", "v2"),)),
    )
    # The same update again changes nothing: no revision step, no audit entry.
    await central.call("PUT", "/v1/dataplanes/shop/orders-1", token=orders, json=update,
                       status=204)
    assert await central.store.mesh_revision("shop") == before + 1
    actions = [e["action"] for e in (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]]
    assert actions.count("dataplane.update") == 1


async def test_an_update_cannot_change_identities_or_act_for_another(central: Central) -> None:
    await central.mesh("shop")
    node = await joined(central, agent(), "web", "orders")
    other = await joined(central, agent("vm-2"), "web")
    more = {"node": "n", "address": "10.0.0.1", "inbounds": [
        {"service": "web", "port": 15443}, {"service": "orders", "port": 15444}]}
    answer = await central.call("PUT", "/v1/dataplanes/shop/vm-1", token=node, json=more,
                                status=403)
    assert "from web to orders, web" in answer["error"] and "join again" in answer["error"]
    same = {"node": "n", "address": "10.0.0.1", "inbounds": [{"service": "web", "port": 15443}]}
    await central.call("PUT", "/v1/dataplanes/shop/vm-1", token=other, json=same, status=401)
    bad = {**same, "address": "vm-1.example"}
    answer = await central.call("PUT", "/v1/dataplanes/shop/vm-1", token=node, json=bad,
                                status=400)
    assert answer["error"].startswith("address:")
    view = (await central.dataplanes("shop"))["vm-1"]
    assert view["address"] == "10.0.0.1" and view["node"] == "node-vm-1"


# ---------------------------------------------------------------------------- health


async def test_unhealthy_services_leave_every_callers_catalog_and_return(
    central: Central, capsys: pytest.CaptureFixture[str]
) -> None:
    await central.mesh("shop")
    web_node = await joined(
        central,
        agent("web-1", address="10.0.0.1",
              outbounds=[OutboundSpec(service="orders", port=16001, source="web")]),
        "web",
    )
    nodes = {}
    for name, address in [("orders-1", "10.0.0.2"), ("orders-2", "10.0.0.3")]:
        inbound = InboundSpec(service="orders", port=15443)
        nodes[name] = await joined(
            central, agent(name, address=address, inbounds=[inbound]), "orders"
        )
    config_path = "/v1/dataplanes/shop/web-1/config"

    async def hosts(after: int = 0, wait: float = 0) -> tuple[int, list[str]]:
        answer = await central.call(
            "GET", f"{config_path}?after={after}&wait={wait:g}", token=web_node
        )
        return answer["version"], [e["host"] for e in answer["endpoints"]["orders"]]

    async def report(name: str, unhealthy: list[str] | None) -> None:
        body: dict[str, Any] = {"applied_version": 1}
        if unhealthy is not None:
            body["unhealthy"] = unhealthy
        await central.call(
            "PUT", f"/v1/dataplanes/shop/{name}/status", token=nodes[name], status=204, json=body
        )

    version, found = await hosts()
    assert found == ["10.0.0.2", "10.0.0.3"]
    # A report that says all is well, or says nothing (an older agent), wakes nobody.
    await report("orders-2", [])
    await report("orders-2", None)
    assert await central.store.mesh_revision("shop") == version
    # orders-2's app fails: the waiting long poll returns without it.
    async with trio.open_nursery() as nursery:
        seen: list[tuple[int, list[str]]] = []

        async def poll() -> None:
            seen.append(await hosts(after=version, wait=30))

        nursery.start_soon(poll)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert seen == []
        # A name it does not serve is dropped, not stored.
        await report("orders-2", ["orders", "ghost"])
    assert seen == [(version + 1, ["10.0.0.2"])]
    view = (await central.dataplanes("shop"))["orders-2"]
    assert (view["unhealthy"], view["in_catalog"], view["online"]) == (["orders"], True, True)
    # The same report again changes nothing.
    await report("orders-2", ["orders"])
    assert await central.store.mesh_revision("shop") == version + 1
    # Both unhealthy: panic, the catalog lists both rather than none.
    await report("orders-1", ["orders"])
    assert await hosts() == (version + 2, ["10.0.0.2", "10.0.0.3"])
    # Healthy again: back.
    await report("orders-1", [])
    await report("orders-2", [])
    assert await hosts() == (version + 4, ["10.0.0.2", "10.0.0.3"])
    assert (await central.dataplanes("shop"))["orders-2"]["unhealthy"] == []
    err = capsys.readouterr().err
    assert err.count("services unhealthy: they leave the built-in catalog") == 2
    assert err.count("every endpoint of a service is unhealthy; the built-in catalog keeps") == 1
    assert err.count("services healthy again: they return to the built-in catalog") == 2


def test_reported_unhealthy_keeps_only_inbound_services() -> None:
    request = agent(inbounds=[InboundSpec(service="web", port=1), InboundSpec(service="api", port=2)])
    record = new_dataplane(
        request.request, node_token_id="tok", now=1.0, cert_not_after=2.0
    )
    assert reported_unhealthy(record, []) == ()
    assert reported_unhealthy(record, ["web", "ghost", "api", "web"]) == ("api", "web")
    assert reported_unhealthy(record, ["ghost"]) == ()
