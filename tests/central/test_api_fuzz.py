"""Fuzzing the central agent's API from its own OpenAPI document: every operation it
lists, with arbitrary JSON, garbage bytes, wrong types, oversized bodies, unknown or
odd path parameters and every kind of credential. Whatever comes in, the answer is a
JSON error of one line with a 4xx status (or a success), never a 500 or a traceback.

Served by hypercorn on loopback (plain HTTP: TLS is not what is fuzzed) over a real
SQLite store, driven by hypothesis; the examples per operation are bounded so the suite stays fast."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, cast
from urllib.parse import quote

import httpx
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshagent.central.api import OPENAPI, create_app
from meshagent.central.auth import ensure_admin_token
from meshagent.central.store import SqliteStore
from meshagent.central.web import CentralState
from meshagent.demo.ports import free_port
from meshagent.pki.csr import make_csr
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes

MAX_BODY = 4096
OPERATIONS = sorted(
    (path, method.upper())
    for path, item in OPENAPI["paths"].items()
    for method in item
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# Keys the real bodies use, so fuzzed bodies get past "unknown field" into the checks.
KNOWN_KEYS = [
    "name", "mtls", "ca", "ca_cert", "ca_key", "default_allow", "services", "ttl", "uses",
    "meshes", "mesh", "dataplane", "node", "address", "inbounds", "outbounds", "csrs",
    "applied_version", "state", "error", "cert_not_after", "service", "port", "source",
]
shaped_bodies = st.dictionaries(st.sampled_from(KNOWN_KEYS), json_values, max_size=6)
path_values = st.sampled_from(
    ["shop", "nope", "Shop", "a" * 300, "..", "%2e%2e", "x%00y", "TrafficRoute", "vm-1", "-"]
)


def body_strategy() -> st.SearchStrategy[tuple[bytes, str]]:
    as_json = st.one_of(json_values, shaped_bodies).map(
        lambda v: (json.dumps(v).encode(), "application/json")
    )
    garbage = st.binary(max_size=64).map(lambda b: (b, "application/json"))
    toml = st.text(max_size=80).map(lambda t: (t.encode(), "application/toml"))
    other = st.binary(max_size=16).map(lambda b: (b, "text/plain"))
    huge = st.just((b"{" + b" " * (MAX_BODY + 10) + b"}", "application/json"))
    return st.one_of(as_json, garbage, toml, other, huge)


@dataclass
class Server:
    """The API served by hypercorn on a loopback port, in a thread with its own trio
    loop, with a mesh, a joined dataplane and one of each credential."""

    url: str
    tokens: dict[str, str]


async def _prepare(client: httpx.AsyncClient, admin: str) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {admin}"}
    await client.post("/v1/meshes", json={"name": "shop"}, headers=auth)
    made = await client.post(
        "/v1/meshes/shop/tokens", json={"services": ["web"], "uses": 5}, headers=auth
    )
    join = made.json()["token"]
    csr, _ = make_csr("shop", "web")
    joined = await client.post(
        "/v1/join",
        headers={"Authorization": f"Bearer {join}"},
        json={"mesh": "shop", "dataplane": "vm-1", "node": "vm-1", "address": "10.0.0.1",
              "inbounds": [{"service": "web", "port": 1}], "csrs": {"web": csr.decode()}},
    )
    assert joined.status_code == 201, joined.text
    return {
        "admin": admin,
        "join": join,
        "node": joined.json()["node_token"],
        "bogus": "ma1_0000_nope",
        "garbage": "not a token at all",
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    ready = threading.Event()
    found: dict[str, Any] = {}
    stop_token: list[trio.lowlevel.TrioToken] = []

    async def main() -> None:
        stop = trio.Event()
        stop_token.append(trio.lowlevel.current_trio_token())
        found["stop"] = stop
        async with await SqliteStore.open(tmp / "central.db") as store:
            await ensure_admin_token(store, tmp / "admin.token", now=1.0)
            state = CentralState(
                store=store,
                seal_key=key_from_file_bytes(new_key_file_bytes()),
                join_token_ttl_seconds=3600,
                max_body_bytes=MAX_BODY,
                cert_ttl_seconds=3600,
            )
            app = create_app(state)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
                found["tokens"] = await _prepare(
                    client, (tmp / "admin.token").read_text().strip()
                )
            config = HypercornConfig()
            config.bind = [f"127.0.0.1:{port}"]
            config.accesslog = None
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    partial(serve, cast("ASGIFramework", app), config, shutdown_trigger=stop.wait)
                )
                ready.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(30), "the fuzzed server did not start"
    try:
        yield Server(f"http://127.0.0.1:{port}", found["tokens"])
    finally:
        trio.from_thread.run_sync(found["stop"].set, trio_token=stop_token[0])
        thread.join(10)


def check_answer(response: httpx.Response, what: str) -> None:
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text}"
    if response.status_code == 204:
        return
    assert response.headers["content-type"].startswith("application/json"), what
    if response.status_code >= 400:
        answer = response.json()
        assert isinstance(answer.get("error"), str) and answer["error"], (what, answer)
        assert "\n" not in answer["error"] and "Traceback" not in answer["error"], what


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_no_input_makes_an_operation_fail_with_a_500(
    server: Server, path: str, method: str
) -> None:
    params = [part[1:-1] for part in path.split("/") if part.startswith("{")]
    # A connection per request: a server may close a connection after refusing a body it
    # did not read (413), and a reused one would fail on the client's side, not ours.
    client = httpx.Client(
        base_url=server.url, timeout=10, trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
    )

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(
        values=st.fixed_dictionaries({p: path_values for p in params}),
        body=body_strategy(),
        credential=st.sampled_from(["admin", "join", "node", "bogus", "garbage", None]),
        query=st.dictionaries(
            st.sampled_from(["after", "wait", "limit", "kind"]),
            st.sampled_from(["0", "-1", "1e9", "nan", "abc", "1", ""]),
            max_size=2,
        ),
    )
    def run(
        values: dict[str, str], body: tuple[bytes, str], credential: str | None,
        query: dict[str, str],
    ) -> None:
        url = path.format(**{k: quote(v, safe="%") for k, v in values.items()})
        headers = {"Content-Type": body[1]}
        if credential is not None:
            headers["Authorization"] = f"Bearer {server.tokens[credential]}"
        response = client.request(
            method, url, content=body[0] if method != "GET" else None,
            headers=headers, params=query,
        )
        check_answer(response, f"{method} {url} ({credential}, {body[1]})")

    try:
        run()
    finally:
        client.close()


def test_every_documented_operation_is_fuzzed() -> None:
    assert len(OPERATIONS) >= 18
    assert ("/v1/join", "POST") in OPERATIONS
