"""The HTTP/1.1 proxy on real loopback sockets: a real HTTP client (httpx), a real HTTP
app (h11), two agents' data paths with real mTLS between them."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import random
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import trio

from meshagent import log
from meshagent.dataplane import http_outbound, http_proxy, pool
from meshagent.dataplane import inbound as inbound_side
from meshagent.dataplane.connection import HttpStats
from meshagent.dataplane.nativepump import ENV_SWITCH
from meshagent.dataplane.pool import MAX_CONNECTING_PER_KEY, Upstream
from meshagent.dataplane.serve import DataplaneHandle, serve_dataplane
from meshagent.dataplane.tls import TlsContexts
from meshagent.snapshot.model import (
    Backend,
    Endpoint,
    HttpMatch,
    InboundListener,
    OutboundListener,
    OutboundRoutes,
    RequestPolicy,
    RouteRule,
    Snapshot,
    Timeouts,
)
from tests.dataplane.test_proxy import StaticSource
from tests.support.http_app import serve_http_app
from tests.support.logs import captured_log
from tests.support.net import free_port, full_backlog, read_head, serve_app, wait_until
from tests.support.pki import MeshCa, make_ca

MESH = "shop"
T = TypeVar("T")
TIMEOUTS = Timeouts(connect_seconds=2, handshake_seconds=2)


async def start_app_agent(
    nursery: trio.Nursery, ca: MeshCa, name: str, service: str = "orders",
    app_port: int | None = None, timeouts: Timeouts = TIMEOUTS, app_host: str = "127.0.0.1",
) -> tuple[int, DataplaneHandle]:
    """An HTTP app (the demo's, unless ``app_port`` has one) behind an HTTP inbound on
    127.0.0.2; returns the inbound port."""
    if app_port is None:
        app_port = await nursery.start(serve_http_app, name)
    port = free_port("127.0.0.2")
    snapshot = Snapshot(
        version=1, mesh=MESH, timeouts=timeouts,
        inbounds=(InboundListener(name=f"inbound:{name}", service=service, bind="127.0.0.2",
                                  port=port, app_host=app_host, app_port=app_port,
                                  protocol="http"),),
    )
    handle = await nursery.start(serve_dataplane, StaticSource(snapshot), TlsContexts({service: ca.issue(service)}))
    return port, handle


async def start_web(
    nursery: trio.Nursery, ca: MeshCa, endpoints: list[Endpoint], routes: OutboundRoutes | None = None,
    service: str = "orders", policies: dict[str, RequestPolicy] | None = None,
    max_connections: int = 10_000, timeouts: Timeouts = TIMEOUTS,
) -> tuple[int, DataplaneHandle]:
    port = free_port()
    snapshot = Snapshot(
        version=1, mesh=MESH, timeouts=timeouts,
        outbounds=(OutboundListener(name="outbound:http", service=service, source="web",
                                    bind="127.0.0.1", port=port, protocol="http",
                                    max_connections=max_connections),),
        endpoints={"orders": tuple(endpoints)},
        routes={service: routes} if routes else {},
        request_policies=policies or {},
    )
    handle = await nursery.start(
        functools.partial(serve_dataplane, rng=random.Random(11)),
        StaticSource(snapshot), TlsContexts({"web": ca.issue("web")}),
    )
    return port, handle


def ep(port: int, version: str = "v1") -> Endpoint:
    return Endpoint(host="127.0.0.2", port=port, service="orders", tags=(("version", version),))


def client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10)


@pytest.fixture
def ca(tmp_path: Path) -> MeshCa:
    return make_ca(tmp_path / "ca", MESH)


async def test_requests_cross_both_agents_with_mesh_headers_over_one_reused_connection(
    nursery: trio.Nursery, ca: MeshCa
) -> None:
    inbound_port, inbound = await start_app_agent(nursery, ca, "orders-a")
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:
        seen = []
        for n in range(20):
            response = await http.get(f"/orders/{n}?x=1", headers={"x-meshagent-source": "forged"})
            assert response.status_code == 200
            seen.append(response.json())
        head = await http.head("/orders/1")
        assert head.status_code == 200 and head.content == b"" and head.headers["x-app"] == "orders-a"
    assert [s["path"] for s in seen] == [f"/orders/{n}?x=1" for n in range(20)]
    assert {s["source"] for s in seen} == {"web"}  # verified identity; the forged one is gone
    assert len({s["request_id"] for s in seen}) == 20
    assert all(s["traceparent"].startswith("00-") for s in seen)
    # 21 requests, one client connection, one mTLS connection between the agents.
    assert inbound.context.counters.accepted == 1


async def test_bodies_stream_both_ways(nursery: trio.Nursery, ca: MeshCa) -> None:
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a")
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:
        big = b"z" * (8 * 1024 * 1024)
        assert (await http.post("/upload", content=big)).json()["received"] == len(big)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b"c" * 100_000

        assert (await http.post("/upload", content=chunks())).json()["received"] == 1_000_000
        chunked = await http.get("/chunked")
        assert chunked.text == "part0;part1;part2;part3;part4;"
        closing = await http.get("/close")
        assert closing.text == "until the end"
        assert (await http.get("/after-close")).status_code == 200


async def test_path_rules_rewrite_and_weighted_split(nursery: trio.Nursery, ca: MeshCa) -> None:
    v1_port, _ = await start_app_agent(nursery, ca, "orders-v1")
    v2_port, _ = await start_app_agent(nursery, ca, "orders-v2")
    routes = OutboundRoutes(rules=(
        RouteRule(route="canary-header", match=HttpMatch(path_prefix="/orders", headers=()),
                  backends=(Backend(service="orders", tags=(("version", "v1"),), weight=90),
                            Backend(service="orders", tags=(("version", "v2"),), weight=10)),
                  rewrite_prefix="/api/orders"),
    ))
    web_port, _ = await start_web(nursery, ca, [ep(v1_port, "v1"), ep(v2_port, "v2")], routes, service="monolith")
    async with client(web_port) as http:
        answers = [(await http.get("/orders/7?q=1")).json() for _ in range(600)]
        missing = await http.get("/users/1")
    assert {a["path"] for a in answers} == {"/api/orders/7?q=1"}
    share = Counter(a["app"] for a in answers)["orders-v2"] / len(answers)
    assert 0.06 <= share <= 0.14, share
    assert missing.status_code == 404 and "no route for GET /users/1 to monolith" in missing.text


async def test_sticky_cookie_keeps_a_user_on_one_subset(nursery: trio.Nursery, ca: MeshCa) -> None:
    v1_port, _ = await start_app_agent(nursery, ca, "orders-v1")
    v2_port, _ = await start_app_agent(nursery, ca, "orders-v2")
    routes = OutboundRoutes(rules=(RouteRule(
        route="sticky", sticky_cookie="canary",
        backends=(Backend(service="orders", tags=(("version", "v1"),), weight=50),
                  Backend(service="orders", tags=(("version", "v2"),), weight=50))),))
    web_port, _ = await start_web(nursery, ca, [ep(v1_port, "v1"), ep(v2_port, "v2")], routes)
    apps_per_user = []
    for _ in range(12):
        async with client(web_port) as http:  # a new user: a fresh cookie jar
            first = await http.get("/")
            assert "canary=" in first.headers["set-cookie"]
            apps = {first.json()["app"]} | {(await http.get("/")).json()["app"] for _ in range(8)}
            apps_per_user.append(apps)
    assert all(len(apps) == 1 for apps in apps_per_user)  # nobody flips
    assert {app for apps in apps_per_user for app in apps} == {"orders-v1", "orders-v2"}


async def test_no_endpoint_is_503_naming_the_subset(nursery: trio.Nursery, ca: MeshCa) -> None:
    routes = OutboundRoutes(rules=(RouteRule(route="r", backends=(
        Backend(service="orders", tags=(("version", "v3"),)),)),))
    web_port, _ = await start_web(nursery, ca, [ep(1)], routes)
    async with client(web_port) as http:
        response = await http.get("/")
    assert response.status_code == 503
    assert "no healthy endpoint for orders[version=v3] in mesh shop" in response.text


async def test_malformed_and_pipelined_requests(nursery: trio.Nursery, ca: MeshCa) -> None:
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a")
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    with trio.fail_after(10):
        bad = await trio.open_tcp_stream("127.0.0.1", web_port)
        await bad.send_all(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
        answer = await _read_all(bad)
        assert answer.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in answer
        piped = await trio.open_tcp_stream("127.0.0.1", web_port)
        await piped.send_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\nGET /two HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        both = await _read_all(piped)
    first, second = both.index(b'"/one"'), both.index(b'"/two"')
    assert first < second and both.count(b"HTTP/1.1 200") == 2
    async with client(web_port) as http:  # the listener is unharmed
        assert (await http.get("/fine")).status_code == 200


async def test_upgrade_becomes_a_tunnel(nursery: trio.Nursery, ca: MeshCa, pump: str) -> None:
    inbound_port, inbound = await start_app_agent(nursery, ca, "orders-a")
    web_port, web = await start_web(nursery, ca, [ep(inbound_port)])
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", web_port)
        await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: echo\r\nConnection: upgrade\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(1000)
        assert head.startswith(b"HTTP/1.1 101 ")
        for n in range(3):
            await stream.send_all(f"frame {n}".encode())
            assert await stream.receive_some(100) == f"frame {n}".encode()
        engines = [agent.context.pump for agent in (web, inbound)]
        if pump == "native":  # each agent's C pump carries the tunnel
            assert [engine.active if engine else None for engine in engines] == [1, 1]
        else:
            assert engines == [None, None]
        await stream.aclose()
        if pump == "native":  # the app's end of the echo closes too: both tunnels end
            while any(engine and engine.active for engine in engines):
                await trio.sleep(0.01)


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    await stream.aclose()
    return data




async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_retries_land_on_a_healthy_endpoint_for_idempotent_requests_only(
    nursery: trio.Nursery, ca: MeshCa
) -> None:
    good_port, _ = await start_app_agent(nursery, ca, "good")
    bad_app = await nursery.start(functools.partial(serve_http_app, "bad", status=503))
    bad_port = free_port("127.0.0.2")
    await nursery.start(serve_dataplane, StaticSource(Snapshot(
        version=1, mesh=MESH, timeouts=TIMEOUTS,
        inbounds=(InboundListener(name="bad", service="orders", bind="127.0.0.2", port=bad_port,
                                  app_port=bad_app, protocol="http"),))),
        TlsContexts({"orders": ca.issue("orders")}))
    web_port, _ = await start_web(nursery, ca, [ep(good_port), ep(bad_port)],
                                  policies={"orders": RequestPolicy(retry_attempts=3, retry_statuses=(503,))})
    async with client(web_port) as http:
        gets = [await http.get("/") for _ in range(30)]
        posts = [await http.post("/", content=b"x") for _ in range(30)]
        # PUT is idempotent: its body (up to RETRY_BODY_BYTES) is held and sent again.
        body = bytes(range(256)) * 256  # 64 KiB
        puts = [await http.put("/", content=body) for _ in range(20)]
        chunked = [await http.put("/", content=_chunks(b"a", b"b")) for _ in range(20)]
        big = [await http.put("/", content=body + b"!") for _ in range(20)]
    assert {r.status_code for r in gets} == {200}
    assert {r.json()["app"] for r in gets} == {"good"}
    assert {r.status_code for r in posts} == {200, 503}  # not idempotent: not retried
    assert {r.status_code for r in puts} == {200}
    assert {(r.json()["app"], r.json()["received"]) for r in puts} == {("good", len(body))}
    # Streamed bodies (chunked, or over the limit) go through once: not retried.
    assert {r.status_code for r in chunked} == {200, 503}
    assert {r.status_code for r in big} == {200, 503}
    assert {r.json()["received"] for r in big if r.status_code == 200} == {len(body) + 1}


async def test_timeouts_answer_504_and_a_per_try_timeout_can_retry(
    nursery: trio.Nursery, ca: MeshCa
) -> None:
    slow_app = await nursery.start(functools.partial(serve_http_app, "slow", delay_seconds=60))
    slow_port = free_port("127.0.0.2")
    await nursery.start(serve_dataplane, StaticSource(Snapshot(
        version=1, mesh=MESH, timeouts=TIMEOUTS,
        inbounds=(InboundListener(name="slow", service="orders", bind="127.0.0.2", port=slow_port,
                                  app_port=slow_app, protocol="http"),))),
        TlsContexts({"orders": ca.issue("orders")}))
    only_slow, _ = await start_web(nursery, ca, [ep(slow_port)],
                                   policies={"orders": RequestPolicy(request_seconds=0.5)})
    async with client(only_slow) as http:
        started = trio.current_time()
        response = await http.get("/")
        waited = trio.current_time() - started
    assert response.status_code == 504 and "did not answer within 0.5s" in response.text
    assert waited >= 0.5
    fast_port, _ = await start_app_agent(nursery, ca, "fast")
    both, _ = await start_web(nursery, ca, [ep(slow_port), ep(fast_port)], policies={
        "orders": RequestPolicy(per_try_seconds=0.3, retry_attempts=2, retry_on=("timeout",))})
    async with client(both) as http:
        answers = [await http.get("/") for _ in range(6)]
    assert {r.status_code for r in answers} == {200}


async def test_expect_100_continue_and_x_forwarded_for(nursery: trio.Nursery, ca: MeshCa) -> None:
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a")
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", web_port)
        await stream.send_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = await stream.receive_some(1000)
        assert interim.startswith(b"HTTP/1.1 100 ")  # the client may send its body now
        await stream.send_all(b"hello")
        final = b""
        while b'"received": 5' not in final:
            final += await stream.receive_some(65536)
        assert b"HTTP/1.1 200 " in final
        await stream.aclose()


async def test_a_request_head_that_never_completes_gets_408(nursery: trio.Nursery, ca: MeshCa) -> None:
    port = free_port()
    snapshot = Snapshot(
        version=1, mesh=MESH, timeouts=Timeouts(request_head_seconds=0.3),
        outbounds=(OutboundListener(name="o", service="orders", source="web", bind="127.0.0.1",
                                    port=port, protocol="http"),),
    )
    await nursery.start(serve_dataplane, StaticSource(snapshot), TlsContexts({"web": ca.issue("web")}))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: slow")  # ...and nothing more
        answer = b""
        while chunk := await stream.receive_some(1000):
            answer += chunk
        await stream.aclose()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in answer


async def test_access_log_lines_on_both_agents_share_the_request_id(
    nursery: trio.Nursery, ca: MeshCa, capsys: pytest.CaptureFixture[str]
) -> None:
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a")
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:
        request_id = (await http.get("/logged")).json()["request_id"]
    lines: list[str] = []

    async def both_logged() -> bool:  # the C relays hand their records over in batches
        lines.extend(x for x in capsys.readouterr().err.splitlines() if "logger=access" in x)
        return len(lines) >= 2

    await wait_until(both_logged, timeout=5)
    assert len(lines) == 2 and all(f"request_id={request_id}" in line for line in lines)
    outbound_line = next(line for line in lines if "route=" in line)
    for field in ("method=GET", "path=/logged", "status=200", "subset=orders", "endpoint=127.0.0.2:",
                  "attempts=1", "duration_ms="):
        assert field in outbound_line


async def test_a_drain_closes_idle_keep_alive_at_once_and_lets_a_request_finish(
    nursery: trio.Nursery, ca: MeshCa
) -> None:
    slow_port = await nursery.start(
        functools.partial(serve_http_app, "slow", delay_seconds=0.5)
    )
    port = free_port("127.0.0.2")
    snapshot = Snapshot(
        version=1, mesh=MESH, timeouts=TIMEOUTS,
        inbounds=(InboundListener(name="inbound:slow", service="orders", bind="127.0.0.2",
                                  port=port, app_port=slow_port, protocol="http"),),
    )
    inbound: DataplaneHandle = await nursery.start(
        serve_dataplane, StaticSource(snapshot), TlsContexts({"orders": ca.issue("orders")})
    )
    web_port, web = await start_web(nursery, ca, [ep(port)])
    async with client(web_port) as http:
        assert (await http.get("/warm")).status_code == 200
        # Idle now: web's pooled connection to the inbound, the client's to web.
        assert inbound.context.counters.active == 1 and web.context.counters.active == 1
        answers: list[int] = []

        async def slow_request() -> None:
            answers.append((await http.get("/slow")).status_code)

        async with trio.open_nursery() as requests:
            requests.start_soon(slow_request)
            await trio.sleep(0.2)  # the request is in flight
            began = trio.current_time()
            inbound.drain(30)
            web.drain(30)
        assert answers == [200], "the request in flight was cut by the drain"
        with trio.fail_after(3):  # well before the 30 s deadline
            while inbound.context.counters.active or web.context.counters.active:
                await trio.sleep(0.02)
        assert trio.current_time() - began < 3


async def test_a_caller_no_permission_allows_gets_403_with_the_reason(
    nursery: trio.Nursery, ca: MeshCa
) -> None:
    app_port = await nursery.start(serve_http_app, "orders-a")
    port = free_port("127.0.0.2")
    snapshot = Snapshot(
        version=1, mesh=MESH, timeouts=TIMEOUTS, permissions={"orders": ("api",)},
        inbounds=(InboundListener(name="inbound:orders", service="orders", bind="127.0.0.2",
                                  port=port, app_port=app_port, protocol="http"),),
    )
    inbound: DataplaneHandle = await nursery.start(
        serve_dataplane, StaticSource(snapshot), TlsContexts({"orders": ca.issue("orders")})
    )
    web_port, _ = await start_web(nursery, ca, [ep(port)])
    async with client(web_port) as http:
        for _ in range(2):  # the denied connection is closed, never pooled and reused
            answer = await http.get("/orders/1")
            assert answer.status_code == 403
            assert "web may not call orders: no TrafficPermission allows it" in answer.text
    counters = inbound.context.by_listener["inbound:orders"]
    with trio.fail_after(2):  # counted as the inbound closes, just after its answer
        while counters.failures.get("unauthorized", 0) < 2:
            await trio.sleep(0.01)


def pattern(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


async def raw_bodies_app(stream: trio.SocketStream) -> None:
    """``GET /big/N`` answers N bytes (keep-alive); ``GET /cut`` promises 2 MiB, sends
    512 KiB and closes; ``POST /hash`` answers the body's SHA-256; ``POST /early``
    answers 413 at once, then reads the body to its end. A caller that hangs up ends
    the connection, as with any server."""
    with contextlib.suppress(trio.BrokenResourceError):
        await _serve_raw_bodies(stream)


async def _serve_raw_bodies(stream: trio.SocketStream) -> None:
    buffered = b""
    async with stream:
        while (request := await read_head(stream, buffered, 65536)) is not None:
            head, buffered = request
            target = head.split(b" ")[1].decode()
            if head.startswith(b"POST"):
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if target == "/early":
                    await stream.send_all(
                        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\n\r\ntoo big"
                    )
                digest = hashlib.sha256()
                while length:
                    if not buffered:
                        buffered = await stream.receive_some(65536)
                        assert buffered, "the proxy closed inside the body"
                    piece, buffered = buffered[:length], buffered[length:]
                    digest.update(piece)
                    length -= len(piece)
                if target == "/hash":
                    answer = digest.hexdigest().encode()
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer)
                    )
                continue
            if target == "/cut":
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2097152\r\n\r\n")
                await stream.send_all(pattern(512 * 1024))
                return
            body = pattern(int(target.rsplit("/", 1)[1]))
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
            await stream.send_all(head + body)


@pytest.fixture(params=["native", "python"])
def pump(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test runs with the C pump and with the Python pumps."""
    if request.param == "python":
        monkeypatch.setenv(ENV_SWITCH, "0")
    return str(request.param)


async def settled(read: Callable[[], T], want: T) -> T:
    """``read()`` once it equals ``want``, or after 5 s: what the engine did reaches Python
    after the bytes reach the client (relay records in batches, a copy's end when the
    agent's trio loop next runs)."""

    async def reached() -> bool:
        return read() == want

    with trio.move_on_after(5):
        await wait_until(reached, timeout=6)
    return read()


async def relayed(agent: DataplaneHandle, want: dict[str, int]) -> dict[str, int]:
    """The exchanges the agent's C relays finished, by status class, once they reach
    ``want`` or after 5 s."""
    pump = agent.context.pump
    assert pump is not None
    return await settled(lambda: pump.relayed, want)


async def copied(agent: DataplaneHandle, want: int) -> int:
    """The body copies the agent's C pump completed, once they reach ``want`` or after 5 s."""
    pump = agent.context.pump
    assert pump is not None
    return await settled(lambda: pump.copies, want)


# A rule on the path, even one every request matches, keeps an outbound's requests in
# Python (the C relay takes only request-independent routes): its bodies then go through
# http_proxy's copies.
ROUTED = OutboundRoutes(rules=(
    RouteRule(route="all", match=HttpMatch(path_prefix="/"), backends=(Backend(service="orders"),)),
))


async def start_raw_bodies_mesh(
    nursery: trio.Nursery, ca: MeshCa, routes: OutboundRoutes | None = ROUTED
) -> tuple[int, DataplaneHandle, DataplaneHandle]:
    """raw_bodies_app behind an inbound, and an outbound to it: (outbound port, the
    outbound agent, the inbound agent)."""
    app_port = await nursery.start(serve_app, raw_bodies_app)
    inbound_port, inbound = await start_app_agent(nursery, ca, "orders-a", app_port=app_port)
    web_port, web = await start_web(nursery, ca, [ep(inbound_port)], routes)
    return web_port, web, inbound


@pytest.mark.parametrize("routes", [ROUTED, None], ids=["python outbound", "relayed outbound"])
async def test_big_bodies_move_in_the_c_pump_between_requests_on_kept_connections(
    nursery: trio.Nursery, ca: MeshCa, pump: str, routes: OutboundRoutes | None
) -> None:
    web_port, web, inbound = await start_raw_bodies_mesh(nursery, ca, routes)
    sizes = [5, 1_000_000, 70_000, 3_000_000, 0, 100]  # two over NATIVE_BODY_BYTES after a chunk
    async with client(web_port) as http:
        for size in sizes:
            response = await http.get(f"/big/{size}")
            assert response.status_code == 200
            assert response.content == pattern(size), size
    # one client connection, one mTLS connection between the agents, for all of them
    assert inbound.context.counters.accepted == 1
    if pump == "python":
        assert web.context.pump is None and inbound.context.pump is None
        return
    # The inbound's C relay serves all six. The outbound's serves them too, or, with a
    # route on the path, Python does and copies the two big bodies in C.
    assert web.context.pump is not None and inbound.context.pump is not None
    assert await relayed(inbound, {"2xx": len(sizes)}) == {"2xx": len(sizes)}
    if routes is None:
        assert await relayed(web, {"2xx": len(sizes)}) == {"2xx": len(sizes)}
        assert web.context.pump.copies == 0
    else:
        assert await copied(web, 2) == 2 and web.context.pump.relayed == {}


@pytest.mark.parametrize("routes", [ROUTED, None], ids=["python outbound", "relayed outbound"])
async def test_a_body_cut_short_in_the_c_pump_cuts_the_client_only(
    nursery: trio.Nursery, ca: MeshCa, routes: OutboundRoutes | None
) -> None:
    web_port, web, inbound = await start_raw_bodies_mesh(nursery, ca, routes)
    async with client(web_port) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get("/cut")
    async with client(web_port) as http:
        response = await http.get("/big/1000000")
        assert response.content == pattern(1_000_000)
    # A relay counts the cut one as Python does (502), and ends its connection; with a
    # route on the path, the outbound's Python copied the body instead.
    relays = [inbound] if routes else [web, inbound]
    for agent in relays:
        assert await relayed(agent, {"5xx": 1, "2xx": 1}) == {"5xx": 1, "2xx": 1}
    assert web.context.pump is not None
    assert await copied(web, 1 if routes else 0) == (1 if routes else 0)


async def test_without_an_access_log_the_relays_hand_python_sums_not_requests(
    nursery: trio.Nursery, ca: MeshCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(log._Settings.routes, "access", None)  # access log off
    summed: list[int] = []
    record_summary = HttpStats.record_summary

    def spy(self: HttpStats, labels: dict[str, str], *args: object) -> None:
        summed.append(labels.get("destination") == "orders")
        record_summary(self, labels, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(HttpStats, "record_summary", spy)
    port, _ = await start_app_agent(nursery, ca, "orders-a")
    web_port, web = await start_web(nursery, ca, [ep(port)])
    requests = 100
    async with client(web_port) as http:
        for n in range(requests):
            assert (await http.get(f"/n/{n}")).status_code == 200
    assert await relayed(web, {"2xx": requests}) == {"2xx": requests}
    # the outbound's metrics hold every request, from sums (at most 64 to one)
    assert sum(
        count for key, count in web.context.http.requests.items() if key[4] == "2xx"
    ) == requests
    assert requests // 64 < len(summed) < requests // 2 and all(summed)
    latency = web.context.http.latency[("orders", "")]
    assert latency[-2] == requests and latency[-1] > 0


async def test_the_outbound_relay_chooses_the_endpoint_again_every_relay_requests(
    nursery: trio.Nursery, ca: MeshCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_outbound, "RELAY_SECONDS", 3600.0)  # by count alone here
    every = 16
    monkeypatch.setattr(http_outbound, "RELAY_REQUESTS", every)
    a_port, _ = await start_app_agent(nursery, ca, "orders-a")
    b_port, _ = await start_app_agent(nursery, ca, "orders-b")
    web_port, web = await start_web(nursery, ca, [ep(a_port), ep(b_port)])
    async with client(web_port) as http:
        apps = [(await http.get(f"/n/{n}")).json()["app"] for n in range(8 * every)]
    # One choice per block of at least RELAY_REQUESTS requests of a connection: the
    # relay goes on with the old one while Python makes the next (the balancer's round
    # robin), and switches at the first boundary after.
    runs = [(app, len(list(group))) for app, group in itertools.groupby(apps)]
    assert len(runs) >= 4 and {app for app, _ in runs} == {"orders-a", "orders-b"}, runs
    assert all(every <= length <= 2 * every for _, length in runs[:-1]), runs
    assert await relayed(web, {"2xx": len(apps)}) == {"2xx": len(apps)}


async def test_new_client_connections_take_their_turns_of_the_round_robin_cold_or_warm(
    nursery: trio.Nursery, ca: MeshCa, pump: str
) -> None:
    """Each new client connection's first start looks for an idle connection to the
    endpoint it chose; finding none, the choice is kept for when the request comes
    (chosen again, round robin would skip the cold endpoint every time: all to one)."""
    a_port, _ = await start_app_agent(nursery, ca, "orders-a")
    b_port, _ = await start_app_agent(nursery, ca, "orders-b")
    web_port, _ = await start_web(nursery, ca, [ep(a_port), ep(b_port)])
    apps = []
    for n in range(6):  # the first two find both endpoints cold, the others warm
        async with client(web_port) as http:
            apps.append((await http.get(f"/{n}", headers={"Connection": "close"})).json()["app"])
    assert Counter(apps) == {"orders-a": 3, "orders-b": 3}, apps


async def test_the_outbound_relay_chooses_again_after_relay_seconds(
    nursery: trio.Nursery, ca: MeshCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_outbound, "RELAY_SECONDS", 0.3)
    a_port, _ = await start_app_agent(nursery, ca, "orders-a")
    b_port, _ = await start_app_agent(nursery, ca, "orders-b")
    web_port, web = await start_web(nursery, ca, [ep(a_port), ep(b_port)])
    async with client(web_port) as http:
        first = [(await http.get("/n")).json()["app"] for _ in range(3)]
        await trio.sleep(0.5)  # past RELAY_SECONDS, within the relay's hold (1 s)
        then = (await http.get("/n")).json()["app"]
    assert len(set(first)) == 1 and then != first[0]  # chosen again: round robin
    assert await relayed(web, {"2xx": 4}) == {"2xx": 4}


async def test_big_request_bodies_move_in_the_c_pump_and_an_early_answer_still_comes_back(
    nursery: trio.Nursery, ca: MeshCa, pump: str
) -> None:
    web_port, web, inbound = await start_raw_bodies_mesh(nursery, ca)
    bodies = [os.urandom(3_000_000), b"small", os.urandom(700_000)]
    async with client(web_port) as http:
        for body in bodies:
            response = await http.post("/hash", content=body)
            assert response.text == hashlib.sha256(body).hexdigest()
        # The app answers before it reads the body: each agent's copy stops there and
        # Python streams the rest while it relays the 413.
        early = await http.post("/early", content=os.urandom(2_000_000))
        assert (early.status_code, early.text) == (413, "too big")
        again = await http.post("/hash", content=b"after")
        assert again.text == hashlib.sha256(b"after").hexdigest()
    assert inbound.context.counters.accepted == 1
    for agent in (web, inbound):
        engine = agent.context.pump
        if pump == "native":
            assert engine is not None and engine.copies >= 2  # the two big bodies at least
        else:
            assert engine is None


async def test_a_listener_at_its_limit_closes_an_idle_keep_alive_connection_for_a_new_one(
    nursery: trio.Nursery, ca: MeshCa
) -> None:
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a")
    web_port, web = await start_web(nursery, ca, [ep(inbound_port)], max_connections=2)
    with trio.fail_after(10):
        async with client(web_port) as first, client(web_port) as second:
            assert (await first.get("/a")).status_code == 200  # both kept alive, idle
            assert (await second.get("/b")).status_code == 200
            async with client(web_port) as third:  # waits for a place without the reclaim
                assert (await third.get("/c")).status_code == 200
            # the first, idle the longest, was closed; its client reconnects by itself
            assert (await first.get("/d")).status_code == 200
    assert web.context.counters.accepted == 4


async def get_at_once(
    port: int, count: int, answered: Callable[[httpx.Response], None], *, timeout: float = 30
) -> None:
    """``count`` GETs (/0, /1, ...) to the outbound on ``port`` at once, each on a
    connection of its own; ``answered`` hears each response as it comes."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=timeout, limits=limits
    ) as http, trio.open_nursery() as requests:

        async def get(n: int) -> None:
            answered(await http.get(f"/{n}"))

        for n in range(count):
            requests.start_soon(get, n)


async def start_silent_endpoint(
    nursery: trio.Nursery, accepted: Callable[[], None] = lambda: None
) -> int:
    """An endpoint on 127.0.0.2 that accepts (``accepted`` hears each) and never says a
    word, so a handshake with it times out; returns its port."""

    async def silent(stream: trio.SocketStream) -> None:
        accepted()
        await trio.sleep_forever()

    port: int = await nursery.start(serve_app, silent, "127.0.0.2")
    return port


async def test_a_burst_of_first_requests_starts_at_most_64_handshakes_with_an_endpoint(
    nursery: trio.Nursery, ca: MeshCa
) -> None:
    """An endpoint that accepts and never handshakes: of 70 requests at once, 64
    connect; the other 6 wait in line, and connect only once one of the 64 gave up
    (its handshake timeout). The agent logs that failure before the slot's next
    connect can start (no checkpoint between them), so each accepted connection
    records how many failures the log held by then (in any order: a slower host
    only makes fewer of them come before the first failure)."""
    assert MAX_CONNECTING_PER_KEY == 64
    failures_before: list[int] = []  # per accepted connection, in accept order
    answers: list[httpx.Response] = []
    with captured_log() as out:
        silent_port = await start_silent_endpoint(
            nursery,
            lambda: failures_before.append(out.getvalue().count('event="endpoint failed"')),
        )
        web_port, _ = await start_web(
            nursery, ca, [ep(silent_port)],
            timeouts=Timeouts(connect_seconds=1, handshake_seconds=1),
        )
        await get_at_once(web_port, 70, answers.append)
    assert len(answers) == 70 and {r.status_code for r in answers} == {503}
    assert len(failures_before) >= 70
    # At most 64 came before any failure (in the burst); the rest only after one.
    assert failures_before.count(0) <= 64, failures_before


def count_app_acquires(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per acquire of an app connection from now on, whether it may wait in line
    (``decide``'s do, the C relay's ``start``'s do not)."""
    in_line: list[bool] = []
    app_acquire = inbound_side.AppPool.acquire

    async def acquire(self: inbound_side.AppPool, *, wait: bool = True) -> tuple[Upstream, bool]:
        in_line.append(wait)
        return await app_acquire(self, wait=wait)

    monkeypatch.setattr(inbound_side.AppPool, "acquire", acquire)
    return in_line


async def test_a_request_waits_in_line_for_a_busy_app_once_then_gets_503(
    nursery: trio.Nursery, ca: MeshCa, pump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One connect to the app at a time (the bound lowered to 1), and an app that never
    accepts: a connect fails at the connect timeout, 1 s. Of three requests at once,
    one connects (502 at 1 s, not a second connect) and one waits in line and gets the
    slot then (502 at 2 s). The third's wait in line, as long as a connect, runs out
    first: 503, before the second's answer. Had the C relay's start waited and then the
    request's own decide waited again, it would have got the slot at 2 s and answered
    502 at 3 s, or 503 at 2 s when its wait ran out first: either way that request
    would have waited in line once more, which the test counts."""
    monkeypatch.setattr(pool, "MAX_CONNECTING_PER_KEY", 1)
    in_line = count_app_acquires(monkeypatch)
    async with full_backlog() as app_port:
        inbound_port, inbound = await start_app_agent(
            nursery, ca, "orders-a", app_port=app_port,
            timeouts=Timeouts(connect_seconds=1, handshake_seconds=2),
        )
        web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
        answered: list[int] = []  # in the order the answers came
        await get_at_once(web_port, 3, lambda response: answered.append(response.status_code))
    assert sorted(answered) == [502, 502, 503], answered
    assert answered[-1] == 502, answered
    assert inbound.context.counters.busy == 1
    # Every request's decide waits in line, except (with the C relay) the one whose
    # connect in the relay's start failed: that was its one try.
    assert in_line.count(True) == (2 if pump == "native" else 3), in_line


def closing_app(accepted: list[int]) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """An app that answers one request, ``Connection: close``, and closes (keep-alive
    off); ``accepted`` counts its connections."""

    async def serve(stream: trio.SocketStream) -> None:
        accepted.append(1)
        async with stream:
            if await read_head(stream) is None:
                return
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )

    return serve


async def test_an_app_that_closes_after_every_answer_is_connected_again_per_request_only(
    nursery: trio.Nursery, ca: MeshCa, pump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller keeps its connection (the app's close is hop-by-hop), and the inbound
    connects the app again for each request on it: with the C relay, the relay itself,
    as the next request begins (one connection from Python, the first); and not after
    the last request (a connect made ahead held an app connection, or with a hung app
    a connect slot, for no request)."""
    acquires = count_app_acquires(monkeypatch)
    accepted: list[int] = []
    app_port = await nursery.start(serve_app, closing_app(accepted))
    inbound_port, inbound = await start_app_agent(nursery, ca, "orders-a", app_port=app_port)
    web_port, web = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:
        for n in range(3):
            response = await http.get(f"/{n}")
            assert (response.status_code, response.content) == (200, b"ok")
    assert inbound.context.counters.active == 1  # web's kept connection to the inbound
    web.drain(5)  # closes it: the inbound sees its caller end after the last request

    async def closed() -> bool:
        return inbound.context.counters.active == 0

    await wait_until(closed, timeout=10)
    assert len(accepted) == 3
    assert len(acquires) == (1 if pump == "native" else 3)


async def test_an_app_on_another_address_of_the_host_is_connected_there_every_time(
    nursery: trio.Nursery, ca: MeshCa, pump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``app_host``: an app that listens on one address only (not 127.0.0.1) and closes
    after every answer is connected there by Python first, then by the C relay as each
    next request begins."""
    acquires = count_app_acquires(monkeypatch)
    accepted: list[int] = []
    app_port = await nursery.start(serve_app, closing_app(accepted), "127.0.0.7")
    inbound_port, _ = await start_app_agent(
        nursery, ca, "orders-a", app_port=app_port, app_host="127.0.0.7"
    )
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:
        for n in range(3):
            response = await http.get(f"/{n}")
            assert (response.status_code, response.content) == (200, b"ok")
    assert len(accepted) == 3
    assert len(acquires) == (1 if pump == "native" else 3)


async def read_ok(stream: trio.SocketStream) -> bytes:
    """One answer of ``closing_app`` as it reaches the caller (its body is ``ok``)."""
    answer = b""
    with trio.fail_after(5):
        while b"\r\n\r\n" not in answer or not answer.endswith(b"ok"):
            data = await stream.receive_some(4096)
            assert data, answer
            answer += data
    return answer


async def settled_agents() -> None:
    """Until every task of the test (both agents, the app) has waited for a moment:
    what a connection's arrival sets off has run by then."""
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked(cushion=0.1)


async def test_a_client_that_connects_and_sends_nothing_holds_no_connection_past_its_agent(
    nursery: trio.Nursery, ca: MeshCa, pump: str
) -> None:
    """A caller's connection that carries no request yet (a preconnect, a TCP probe)
    opens no connection to the other agent, nor that agent one to its app: a new
    upstream connection is made as a request's first bytes come, not when the
    connection does."""
    accepted: list[int] = []
    app_port = await nursery.start(serve_app, closing_app(accepted))
    inbound_port, inbound = await start_app_agent(nursery, ca, "orders-a", app_port=app_port)
    web_port, web = await start_web(nursery, ca, [ep(inbound_port)])
    async with await trio.open_tcp_stream("127.0.0.1", web_port) as stream:

        async def taken() -> bool:
            return web.context.counters.active == 1

        await wait_until(taken, timeout=10)
        await settled_agents()
        assert (inbound.context.counters.accepted, len(accepted)) == (0, 0)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await read_ok(stream)).startswith(b"HTTP/1.1 200 ")
    assert (inbound.context.counters.accepted, len(accepted)) == (1, 1)


async def test_a_new_client_connection_takes_an_idle_pooled_connection_before_its_request(
    nursery: trio.Nursery, ca: MeshCa, pump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an idle connection to the other agent in the pool, a new client connection
    takes it at once, while its request is on its way (a new connection would wait
    for the request); the request then goes on it: one connection between the agents
    in all."""
    taken: list[bool] = []  # per pool take from now on: whether one was idle
    pool_take = pool.ConnectionPool.take

    def take(self: pool.ConnectionPool, key: object) -> Upstream | None:
        stream = pool_take(self, key)
        taken.append(stream is not None)
        return stream

    inbound_port, inbound = await start_app_agent(nursery, ca, "orders-a")
    web_port, web = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:  # leaves one idle connection to the inbound
        assert (await http.get("/1")).status_code == 200

    async def closed() -> bool:
        return web.context.counters.active == 0

    await wait_until(closed, timeout=10)
    monkeypatch.setattr(pool.ConnectionPool, "take", take)
    async with await trio.open_tcp_stream("127.0.0.1", web_port) as stream:
        await settled_agents()
        assert taken.count(True) == (1 if pump == "native" else 0), taken
        await stream.send_all(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        with trio.fail_after(5):
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200 ")
    assert inbound.context.counters.accepted == 1


async def test_a_connection_idle_past_the_relay_s_hold_leaves_its_upstream_in_the_pool(
    nursery: trio.Nursery, ca: MeshCa, pump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the relay's hold (lowered to 50 ms) an idle connection gives its upstream
    back, and does not take it again until a request comes: taken at once, it would be
    held through hold after hold, the agents never at rest."""
    monkeypatch.setattr(http_proxy, "RELAY_HOLD_SECONDS", 0.05)
    inbound_port, inbound = await start_app_agent(nursery, ca, "orders-a")
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:
        assert (await http.get("/1")).status_code == 200
        await settled_agents()  # never, were the holds to follow each other
        assert (await http.get("/2")).status_code == 200
    assert inbound.context.counters.accepted == 1


async def test_after_a_request_served_in_python_the_next_upstream_waits_for_the_next_request(
    nursery: trio.Nursery, ca: MeshCa, pump: str
) -> None:
    """A chunked request is one the C relay hands to Python, on both agents. After it
    the relay takes over again, but connects the app (here one that closes after every
    answer) only as the next request begins: one app connection per request, none
    after the last."""
    accepted: list[int] = []
    app_port = await nursery.start(serve_app, closing_app(accepted))
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a", app_port=app_port)
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    async with await trio.open_tcp_stream("127.0.0.1", web_port) as stream:
        await stream.send_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n"
        )
        assert (await read_ok(stream)).startswith(b"HTTP/1.1 200 ")
        await settled_agents()
        assert len(accepted) == 1
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await read_ok(stream)).startswith(b"HTTP/1.1 200 ")
        await settled_agents()
        assert len(accepted) == 2


async def test_an_app_gone_after_closing_its_connection_gets_the_next_request_a_502_with_why(
    nursery: trio.Nursery, ca: MeshCa, pump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app answers one request, closes, and stops listening: the next request's
    connect (the C relay's own, or Python's) is refused, and the caller hears why, from
    that one connect: the relay's failure is the request's try, so decide does not
    connect again (it is the one that may wait in line: ``wait``)."""
    in_line = count_app_acquires(monkeypatch)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    app_port = listeners[0].socket.getsockname()[1]

    async def app_once() -> None:
        async with listeners[0]:
            stream = await listeners[0].accept()
        await closing_app([])(stream)

    nursery.start_soon(app_once)
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a", app_port=app_port)
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    async with client(web_port) as http:
        assert (await http.get("/1")).status_code == 200
        response = await http.get("/2")
    assert response.status_code == 502, response.text
    assert f"connect app 127.0.0.1:{app_port}: connection refused" in response.text
    assert in_line.count(True) == (0 if pump == "native" else 2)


async def chunked_app(stream: trio.SocketStream) -> None:
    """Answers each request with a chunked body, keeping the connection."""
    async with stream:
        buffered = b""
        while (request := await read_head(stream, buffered)) is not None:
            buffered = request[1]
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
            )


async def test_an_http_1_0_keep_alive_client_of_a_chunked_answer_is_told_it_ends_at_the_close(
    nursery: trio.Nursery, ca: MeshCa, pump: str
) -> None:
    """An HTTP/1.0 client cannot read chunks: the body goes to it as is, ended by the
    close, which the head says (it asked to keep the connection, and would otherwise
    wait for more until its own timeout)."""
    app_port = await nursery.start(serve_app, chunked_app)
    inbound_port, _ = await start_app_agent(nursery, ca, "orders-a", app_port=app_port)
    web_port, _ = await start_web(nursery, ca, [ep(inbound_port)])
    stream = await trio.open_tcp_stream("127.0.0.1", web_port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
        answer = b""
        with trio.fail_after(5):
            while data := await stream.receive_some(4096):
                answer += data
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in head, head
    assert b"chunked" not in head.lower() and body == b"ok", answer


async def test_a_request_waits_in_line_for_a_busy_endpoint_once(
    nursery: trio.Nursery, ca: MeshCa, pump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbound's side of the test above: one connect to the endpoint at a time and
    an endpoint that accepts and never handshakes (timeout 2 s; a wait in line is
    connect + handshake, 3 s). Of three requests at once, the first's handshake fails
    at 2 s, the second takes the slot then; the third, in line behind both, gives up at
    3 s (503, busy), before the second's handshake fails (4 s): when it is answered
    the agent has logged one failure. Had it waited twice (the C relay's start, then
    decide), it would have been answered at 6 s, after the second failure. Two
    failures in all: a connect that failed in start is not made again in decide."""
    monkeypatch.setattr(pool, "MAX_CONNECTING_PER_KEY", 1)
    silent_port = await start_silent_endpoint(nursery)
    web_port, web = await start_web(
        nursery, ca, [ep(silent_port)], timeouts=Timeouts(connect_seconds=1, handshake_seconds=2)
    )
    statuses: list[int] = []
    busy: list[int] = []  # per busy answer: the failures logged by then
    with captured_log() as out:

        def answered(response: httpx.Response) -> None:
            statuses.append(response.status_code)
            if "connects already in progress" in response.text:
                busy.append(out.getvalue().count('event="endpoint failed"'))

        await get_at_once(web_port, 3, answered)
    assert statuses == [503, 503, 503]
    assert busy == [1], busy
    # one connect per request that got a slot: the first request's failed connect in
    # the C relay's start is its one try (decide does not connect again)
    assert out.getvalue().count('event="endpoint failed"') == 2
    assert web.context.counters.busy == 1


@pytest.mark.parametrize("routes", [ROUTED, None], ids=["python outbound", "relayed outbound"])
async def test_a_cut_names_the_end_that_failed_and_a_client_hang_up_is_info(
    nursery: trio.Nursery, ca: MeshCa, pump: str, routes: OutboundRoutes | None
) -> None:
    web_port, web, inbound = await start_raw_bodies_mesh(nursery, ca, routes)
    with captured_log() as out:
        async with client(web_port) as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/cut")  # the app closes inside the body: upstream
        with trio.fail_after(10):
            while web.context.counters.failed + inbound.context.counters.failed < 2:
                await trio.sleep(0.01)
        # The client reads the head, then hangs up with a reset: downstream.
        stream = await trio.open_tcp_stream("127.0.0.1", web_port)
        await stream.send_all(b"GET /big/30000000 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 200 OK")
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
        with trio.fail_after(10):
            while web.context.counters.failed < 2:
                await trio.sleep(0.01)
    assert web.context.counters.failures == {"upstream-broken": 1, "downstream-broken": 1}
    assert inbound.context.counters.failures["upstream-broken"] == 1  # its app cut it
    lines = [line for line in out.getvalue().splitlines() if "connection failed" in line]
    web_lines = [line for line in lines if "logger=outbound" in line]
    assert len(web_lines) == 2 and not any("level=error" in line for line in lines)
    cut, hang_up = web_lines
    assert "level=warning " in cut and 'error="upstream: ' in cut
    assert "level=info " in hang_up and 'error="downstream: ' in hang_up  # reset, or EPIPE
