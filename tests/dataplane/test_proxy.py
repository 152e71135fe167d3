"""The data path in one process, on real loopback sockets with real mTLS.

Two "hosts": an inbound on 127.0.0.2 fronting an app, an outbound on 127.0.0.1 with
static endpoints. Every bad-peer case must be refused without disturbing other traffic.
"""

from __future__ import annotations

import contextlib
import functools
import random
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from meshagent.dataplane import outbound as outbound_module
from meshagent.dataplane import pool as pool_module
from meshagent.dataplane import tls as meshagent_tls
from meshagent.dataplane.errors import Unauthorized
from meshagent.dataplane.nativepump import ENV_SWITCH, native_problem
from meshagent.dataplane.serve import DataplaneHandle, serve_dataplane
from meshagent.dataplane.tls import IdentityFiles, TlsContexts, check_peer
from meshagent.snapshot.model import (
    Backend,
    Endpoint,
    InboundListener,
    OutboundListener,
    OutboundRoutes,
    RouteRule,
    Snapshot,
    Timeouts,
)
from tests.support.logs import captured_log
from tests.support.net import free_port, round_trip, serve_app, serve_echo
from tests.support.pki import MeshCa, make_ca

MESH = "shop"


@pytest.fixture(autouse=True, params=["native", "python"])
def l4_pump(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with the C pump and with the Python pumps: same behaviour."""
    if request.param == "python":
        monkeypatch.setenv(ENV_SWITCH, "0")
    elif native_problem() is not None:
        pytest.fail(f"the C pump is not available: {native_problem()}")
    return str(request.param)


@dataclass
class StaticSource:
    current: Snapshot


@dataclass
class Pair:
    outbound_port: int
    inbound_port: int
    inbound: DataplaneHandle
    outbound: DataplaneHandle
    ca: MeshCa
    web_tls: TlsContexts


async def serve_count_then_reply(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """An app that reads to EOF, then answers with the byte count: needs half-close."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            total = 0
            while data := await stream.receive_some(65536):
                total += len(data)
            await stream.send_all(f"got {total}".encode())

    await serve_app(handle, "127.0.0.1", task_status=task_status)


def inbound_snapshot(app_port: int, port: int, *, service: str = "orders", **kw: object) -> Snapshot:
    return Snapshot(
        version=1,
        mesh=MESH,
        inbounds=(
            InboundListener(
                name=f"inbound:{service}", service=service, bind="127.0.0.2", port=port,
                app_port=app_port, **kw,  # type: ignore[arg-type]
            ),
        ),
        timeouts=Timeouts(connect_seconds=2, handshake_seconds=2),
    )


def outbound_snapshot(
    port: int, endpoints: Sequence[tuple[str, int]], *, idle: float = 3600, **kw: object
) -> Snapshot:
    return Snapshot(
        version=1,
        mesh=MESH,
        outbounds=(
            OutboundListener(
                name="outbound:orders", service="orders", source="web", bind="127.0.0.1",
                port=port, **kw,  # type: ignore[arg-type]
            ),
        ),
        endpoints={"orders": tuple(Endpoint(host=h, port=p, service="orders") for h, p in endpoints)},
        timeouts=Timeouts(connect_seconds=2, handshake_seconds=2, idle_seconds=idle),
    )


async def start_pair(
    nursery: trio.Nursery,
    tmp_path: Path,
    app_port: int,
    *,
    tls_class: type[TlsContexts] = TlsContexts,
    **outbound_kw: Any,
) -> Pair:
    ca = make_ca(tmp_path / "ca", MESH)
    inbound_port, outbound_port = free_port("127.0.0.2"), free_port()
    inbound = await nursery.start(
        serve_dataplane,
        StaticSource(inbound_snapshot(app_port, inbound_port)),
        TlsContexts({"orders": ca.issue("orders")}),
    )
    web_tls = tls_class({"web": ca.issue("web")})
    outbound = await nursery.start(
        serve_dataplane,
        StaticSource(outbound_snapshot(outbound_port, [("127.0.0.2", inbound_port)], **outbound_kw)),
        web_tls,
    )
    return Pair(outbound_port, inbound_port, inbound, outbound, ca, web_tls)


async def test_bytes_round_trip_through_both_agents(nursery: trio.Nursery, tmp_path: Path) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    payload = bytes(range(256)) * 8192  # 2 MiB
    assert await round_trip("127.0.0.1", pair.outbound_port, payload) == payload
    assert pair.inbound.context.counters.failed == 0


class CountingTls(TlsContexts):
    """Counts the sessions offered for resumption."""

    offered = 0

    def session(
        self, context: ssl.SSLContext, service: str, peer: Hashable
    ) -> ssl.SSLSession | None:
        found = super().session(context, service, peer)
        self.offered += found is not None
        return found


async def test_later_connections_resume_the_tls_session(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("meshagent.dataplane.outbound.POOL_PER_ENDPOINT", 0)  # no reuse
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port, tls_class=CountingTls)
    tls = pair.web_tls
    assert isinstance(tls, CountingTls)
    peer = f"127.0.0.2:{pair.inbound_port}"
    kept = []
    for _ in range(3):
        assert await round_trip("127.0.0.1", pair.outbound_port, b"hello") == b"hello"
        session = tls.session(tls.client("web"), "web", peer)
        assert session is not None and session.has_ticket
        kept.append(session)
    assert tls.offered >= 2 + 3  # the 2nd and 3rd connections, and each check above
    # A kept session serves later connections until it is due for a refresh.
    assert kept[0] is kept[1] is kept[2]
    assert not tls.wants_session(tls.client("web"), "web", peer)
    monkeypatch.setattr("meshagent.dataplane.tls.SESSION_REFRESH_SECONDS", 0.0)
    assert await round_trip("127.0.0.1", pair.outbound_port, b"hello") == b"hello"
    assert tls.session(tls.client("web"), "web", peer) is not kept[0]
    # Renewal: new contexts never get a session made with the old ones.
    tls.swap({"web": pair.ca.issue("web")})
    assert tls.session(tls.client("web"), "web", peer) is None
    assert await round_trip("127.0.0.1", pair.outbound_port, b"again") == b"again"
    assert pair.inbound.context.counters.failed == 0
    assert pair.outbound.context.counters.failed == 0


async def test_half_close_keeps_the_other_direction(nursery: trio.Nursery, tmp_path: Path) -> None:
    app_port = await nursery.start(serve_count_then_reply)
    pair = await start_pair(nursery, tmp_path, app_port)
    # The app answers only after it saw EOF: our FIN must cross both agents, and the
    # answer must still come back on the half-closed connection.
    assert await round_trip("127.0.0.1", pair.outbound_port, b"x" * 100_000) == b"got 100000"


async def test_a_client_reset_is_logged_at_info_as_the_downstream_end(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    context = pair.outbound.context
    with captured_log() as out, trio.fail_after(10):
        client = await trio.open_tcp_stream("127.0.0.1", pair.outbound_port)
        await client.send_all(b"ping")
        assert await client.receive_some(100) == b"ping"  # pumped both ways
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # RST
        while context.counters.failed == 0:
            await trio.sleep(0.01)
    assert context.counters.failures == {"downstream-broken": 1}
    (line,) = [line for line in out.getvalue().splitlines() if "connection failed" in line]
    assert "level=info " in line and 'error="downstream: connection reset by peer"' in line


async def echo_at_once(port: int, clients: int, size: int) -> None:
    """``clients`` round trips through ``port`` (an echo app behind it) at once; each
    gets its own bytes back."""
    results: dict[int, bytes] = {}

    async def one(n: int) -> None:
        results[n] = await round_trip("127.0.0.1", port, str(n).encode() * size)

    async with trio.open_nursery() as nursery:
        for n in range(clients):
            nursery.start_soon(one, n)
    assert all(results[n] == str(n).encode() * size for n in range(clients))


async def test_many_concurrent_connections_are_independent(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    await echo_at_once(pair.outbound_port, 40, 1000)


async def _tls_client(port: int, context: ssl.SSLContext) -> bytes:
    """Handshake as a mesh peer would, send a line, return what comes back (b"" if cut)."""
    with trio.fail_after(5):
        tcp = await trio.open_tcp_stream("127.0.0.2", port)
        tls = trio.SSLStream(tcp, context, server_side=False)
        try:
            await tls.do_handshake()
            await tls.send_all(b"hello")
            return bytes(await tls.receive_some(100))
        except trio.BrokenResourceError:
            return b""
        finally:
            await trio.aclose_forcefully(tls)


def _client_context(files: IdentityFiles | None, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(ca))
    if files is not None:
        ctx.load_cert_chain(files.cert, files.key)
    return ctx


@pytest.mark.parametrize("case", ["plaintext", "garbage", "no-cert", "other-ca", "other-mesh"])
async def test_inbound_refuses_bad_peers_and_keeps_serving(
    nursery: trio.Nursery, tmp_path: Path, case: str
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    if case in ("plaintext", "garbage"):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.2", pair.inbound_port)
            async with stream:
                await stream.send_all(b"GET / HTTP/1.1\r\n\r\n" if case == "plaintext" else bytes(range(256)) * 4)
                try:
                    answer = await stream.receive_some(100)
                except trio.BrokenResourceError:
                    answer = b""
                assert b"hello" not in answer and b"GET" not in answer
    else:
        if case == "no-cert":
            files = None
        elif case == "other-ca":
            files = make_ca(tmp_path / "evil", MESH).issue("web")
        else:
            files = make_ca(tmp_path / "billing", "billing").issue("web")
        assert await _tls_client(pair.inbound_port, _client_context(files, pair.ca.ca_path)) == b""
    with trio.fail_after(5):
        while pair.inbound.context.counters.failed < 1:
            await trio.sleep(0.01)
    counters = pair.inbound.context.by_listener["inbound:orders"]
    assert counters.failures == {"handshake": 1}  # another mesh has another CA: no handshake
    expected = {"plaintext": "not-tls", "garbage": "not-tls", "no-cert": "no-certificate",
                "other-ca": "unknown-ca", "other-mesh": "unknown-ca"}
    assert counters.tls_failures == {expected[case]: 1}
    # Everyone else is still served.
    assert await round_trip("127.0.0.1", pair.outbound_port, b"still here") == b"still here"


async def test_outbound_checks_the_server_identity_and_fails_over(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    ca = make_ca(tmp_path / "ca", MESH)
    impostor_port, good_port, refused_port = (free_port("127.0.0.2") for _ in range(3))
    # An agent that serves "payments" on the address where we expect "orders".
    await nursery.start(
        serve_dataplane,
        StaticSource(inbound_snapshot(app_port, impostor_port, service="payments")),
        TlsContexts({"payments": ca.issue("payments")}),
    )
    await nursery.start(
        serve_dataplane,
        StaticSource(inbound_snapshot(app_port, good_port)),
        TlsContexts({"orders": ca.issue("orders")}),
    )
    outbound_port = free_port()
    endpoints = [("127.0.0.2", refused_port), ("127.0.0.2", impostor_port), ("127.0.0.2", good_port)]
    outbound = await nursery.start(
        serve_dataplane,
        StaticSource(outbound_snapshot(outbound_port, endpoints)),
        TlsContexts({"web": ca.issue("web")}),
    )
    # The first connection tries all three: refused, wrong identity, then the good one.
    for _ in range(5):
        assert await round_trip("127.0.0.1", outbound_port, b"ping") == b"ping"
    assert outbound.context.counters.failed == 0


async def test_no_endpoints_closes_the_client(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", MESH)
    port = free_port()
    outbound = await nursery.start(
        serve_dataplane,
        StaticSource(outbound_snapshot(port, [])),
        TlsContexts({"web": ca.issue("web")}),
    )
    assert await first_answer(port, b"anyone?") == b""
    assert outbound.context.counters.failed == 1


async def first_answer(port: int, payload: bytes) -> bytes:
    """What a client sending ``payload`` to ``port`` first receives (b"" when closed)."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        try:
            await stream.send_all(payload)
            answer = await stream.receive_some(10)
        except trio.BrokenResourceError:  # reset: as good as a close here
            answer = b""
        await stream.aclose()
    return answer


async def test_connection_limit_holds_new_clients_back(nursery: trio.Nursery, tmp_path: Path) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port, max_connections=1)
    with trio.fail_after(10):
        first = await trio.open_tcp_stream("127.0.0.1", pair.outbound_port)
        await first.send_all(b"one")
        assert await first.receive_some(10) == b"one"
        second = await trio.open_tcp_stream("127.0.0.1", pair.outbound_port)  # kernel backlog
        await second.send_all(b"two")
        with trio.move_on_after(0.3) as waited:
            await second.receive_some(10)
        assert waited.cancelled_caught, "second connection served beyond max_connections=1"
        await first.aclose()
        assert await second.receive_some(10) == b"two"
        await second.aclose()


async def test_idle_connections_are_closed(nursery: trio.Nursery, tmp_path: Path) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port, idle=0.3)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", pair.outbound_port)
        await stream.send_all(b"x")
        assert await stream.receive_some(10) == b"x"
        try:
            rest = await stream.receive_some(10)  # nothing moves: the agent must close
        except trio.BrokenResourceError:
            rest = b""
        assert rest == b""
        await stream.aclose()


async def test_drain_lets_open_connections_finish(nursery: trio.Nursery, tmp_path: Path) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", pair.outbound_port)
        await stream.send_all(b"a")
        assert await stream.receive_some(10) == b"a"
        pair.outbound.drain(30)
        # New clients are refused...
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", pair.outbound_port)
        # ...while the open one keeps working.
        await stream.send_all(b"b")
        assert await stream.receive_some(10) == b"b"
        await stream.aclose()


def test_check_peer_accepts_same_mesh_and_rejects_others() -> None:
    cert = {"subjectAltName": (("URI", "spiffe://shop/service/web"),)}
    assert check_peer(cert, mesh="shop", service=None) == "spiffe://shop/service/web"
    assert check_peer(cert, mesh="shop", service="web") == "spiffe://shop/service/web"
    for mesh, service in (("billing", None), ("shop", "orders")):
        with pytest.raises(Unauthorized):
            check_peer(cert, mesh=mesh, service=service)
    with pytest.raises(Unauthorized, match="no spiffe"):
        check_peer({"subjectAltName": (("DNS", "web"),)}, mesh="shop", service=None)
    with pytest.raises(Unauthorized):
        check_peer(None, mesh="shop", service=None)


async def test_a_mesh_client_without_framing_gets_a_plain_tunnel(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # A client with a mesh certificate that does not negotiate ALPN meshagent/1 (not an
    # agent) still reaches the app: bytes go through unframed.
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    context = _client_context(pair.ca.issue("web"), pair.ca.ca_path)
    assert await _tls_client(pair.inbound_port, context) == b"hello"


async def _serve_silence(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Accepts connections and never says a word (a hung agent or a black hole)."""

    async def hang(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    await serve_app(hang, "127.0.0.2", task_status=task_status)


async def test_a_silent_endpoint_times_out_and_the_next_one_serves(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    ca = make_ca(tmp_path / "ca", MESH)
    silent_port = await nursery.start(_serve_silence)
    good_port = free_port("127.0.0.2")
    await nursery.start(
        serve_dataplane,
        StaticSource(inbound_snapshot(app_port, good_port)),
        TlsContexts({"orders": ca.issue("orders")}),
    )
    outbound_port = free_port()
    snapshot = outbound_snapshot(outbound_port, [("127.0.0.2", silent_port), ("127.0.0.2", good_port)])
    snapshot = msgspec.structs.replace(
        snapshot, timeouts=Timeouts(connect_seconds=1, handshake_seconds=0.3)
    )
    outbound = await nursery.start(
        serve_dataplane, StaticSource(snapshot), TlsContexts({"web": ca.issue("web")})
    )
    assert await round_trip("127.0.0.1", outbound_port, b"ping") == b"ping"
    assert outbound.context.counters.failed == 0


async def test_a_client_that_never_handshakes_is_dropped(nursery: trio.Nursery, tmp_path: Path) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)  # handshake deadline: 2 s
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.2", pair.inbound_port)
        with contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some(10) == b""
        await stream.aclose()
        while pair.inbound.context.counters.failed < 1:  # the agent closes, then logs
            await trio.sleep(0.01)


async def _serve_named(name: bytes, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """An app that answers every connection with its name and closes."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(name)

    await serve_app(handle, "127.0.0.1", task_status=task_status)


async def test_tcp_outbound_splits_connections_by_weight_across_subsets(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    # The app calls "monolith"; its route sends 80 % of connections to orders v1 and
    # 20 % to orders v2 (another service: the identity checked is orders').
    ca = make_ca(tmp_path / "ca", MESH)
    orders = {"orders": ca.issue("orders")}
    endpoints = []
    for version in ("v1", "v2"):
        app_port = await nursery.start(_serve_named, version.encode())
        port = free_port("127.0.0.2")
        await nursery.start(serve_dataplane, StaticSource(inbound_snapshot(app_port, port)), TlsContexts(orders))
        endpoints.append(Endpoint(host="127.0.0.2", port=port, service="orders", tags=(("version", version),)))
    outbound_port = free_port()
    snapshot = Snapshot(
        version=1,
        mesh=MESH,
        outbounds=(OutboundListener(name="outbound:monolith", service="monolith", source="web",
                                    bind="127.0.0.1", port=outbound_port),),
        endpoints={"orders": tuple(endpoints)},
        routes={"monolith": OutboundRoutes(rules=(
            RouteRule(route="canary", backends=(
                Backend(service="orders", tags=(("version", "v1"),), weight=80),
                Backend(service="orders", tags=(("version", "v2"),), weight=20),
            )),
        ))},
    )
    await nursery.start(
        functools.partial(serve_dataplane, rng=random.Random(3)),
        StaticSource(snapshot),
        TlsContexts({"web": ca.issue("web")}),
    )
    answers = Counter([await round_trip("127.0.0.1", outbound_port, b"") for _ in range(300)])
    assert set(answers) == {b"v1", b"v2"}
    assert 0.12 <= answers[b"v2"] / 300 <= 0.28  # 20 %; binomial sd 2.3 %, deterministic seed


async def test_a_subset_without_endpoints_is_named_in_the_log(
    nursery: trio.Nursery, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = make_ca(tmp_path / "ca", MESH)
    port = free_port()
    snapshot = Snapshot(
        version=1, mesh=MESH,
        outbounds=(OutboundListener(name="o", service="orders", source="web", bind="127.0.0.1", port=port),),
        endpoints={"orders": (Endpoint(host="127.0.0.2", port=1, service="orders", tags=(("version", "v1"),)),)},
        routes={"orders": OutboundRoutes(rules=(RouteRule(route="r", backends=(
            Backend(service="orders", tags=(("version", "v2"),)),)),))},
    )
    outbound = await nursery.start(serve_dataplane, StaticSource(snapshot), TlsContexts({"web": ca.issue("web")}))
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some(10)
        await stream.aclose()
        while outbound.context.counters.failed < 1:
            await trio.sleep(0.01)
    assert "orders[version=v2]: no healthy endpoint" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["permissive", "off"])
async def test_permissive_and_off_inbounds_take_plaintext_and_mtls(
    nursery: trio.Nursery, tmp_path: Path, mode: str
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    ca = make_ca(tmp_path / "ca", MESH)
    inbound_port = free_port("127.0.0.2")
    snapshot = msgspec.structs.replace(inbound_snapshot(app_port, inbound_port), mtls=mode)
    inbound = await nursery.start(serve_dataplane, StaticSource(snapshot), TlsContexts({"orders": ca.issue("orders")}))
    # A legacy client that knows nothing of the mesh, straight to the inbound port:
    assert await round_trip("127.0.0.2", inbound_port, b"plain") == b"plain"
    assert inbound.context.counters.plaintext == 1
    # An agent, with mTLS (strict outbound) or plaintext (off outbound):
    outbound_port = free_port()
    out = msgspec.structs.replace(outbound_snapshot(outbound_port, [("127.0.0.2", inbound_port)]), mtls=mode)
    await nursery.start(serve_dataplane, StaticSource(out), TlsContexts({"web": ca.issue("web")}))
    payload = b"y" * 300_000
    assert await round_trip("127.0.0.1", outbound_port, payload) == payload
    assert inbound.context.counters.plaintext == (1 if mode == "permissive" else 2)
    # A TLS caller from another CA is still refused in permissive mode.
    evil = _client_context(make_ca(tmp_path / "evil", MESH).issue("web"), ca.ca_path)
    assert await _tls_client(inbound_port, evil) == b""
    assert inbound.context.counters.failed >= 1


async def test_permissive_inbound_serves_a_server_speaks_first_app(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(_serve_named, b"220 smtp ready\r\n")
    ca = make_ca(tmp_path / "ca", MESH)
    port = free_port("127.0.0.2")
    snapshot = msgspec.structs.replace(inbound_snapshot(app_port, port), mtls="permissive")
    await nursery.start(serve_dataplane, StaticSource(snapshot), TlsContexts({"orders": ca.issue("orders")}))
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.2", port)
        assert await stream.receive_some(100) == b"220 smtp ready\r\n"  # after the detect wait
        await stream.aclose()


@pytest.mark.parametrize(("allowed", "served"), [(("web",), True), (("*",), True), (("monolith",), False), (None, True)])
async def test_traffic_permissions_decide_who_may_call(
    nursery: trio.Nursery, tmp_path: Path, allowed: tuple[str, ...] | None, served: bool
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    ca = make_ca(tmp_path / "ca", MESH)
    inbound_port = free_port("127.0.0.2")
    snapshot = inbound_snapshot(app_port, inbound_port)
    if allowed is not None:
        snapshot = msgspec.structs.replace(snapshot, permissions={"orders": allowed})
    inbound = await nursery.start(serve_dataplane, StaticSource(snapshot), TlsContexts({"orders": ca.issue("orders")}))
    outbound_port = free_port()
    await nursery.start(
        serve_dataplane,
        StaticSource(outbound_snapshot(outbound_port, [("127.0.0.2", inbound_port)])),
        TlsContexts({"web": ca.issue("web")}),
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", outbound_port)
        try:
            await stream.send_all(b"may I?")
            await stream.send_eof()
            answer = await stream.receive_some(100)
        except trio.BrokenResourceError:
            answer = b""
        await stream.aclose()
    assert (answer == b"may I?") is served
    if not served:
        while inbound.context.counters.failed < 1:
            await trio.sleep(0.01)
        assert inbound.context.by_listener["inbound:orders"].failures == {"unauthorized": 1}


def test_default_permission_applies_to_inbounds_no_policy_names() -> None:
    base = Snapshot(version=1, mesh=MESH, permissions={"orders": ("web",)})
    assert base.may_call("web", "orders") and not base.may_call("billing", "orders")
    assert base.may_call("billing", "payments")
    deny = msgspec.structs.replace(base, default_allow=False)
    assert not deny.may_call("billing", "payments") and deny.may_call("web", "orders")


async def settled(pair: Pair) -> None:
    """Wait until the outbound finished its connections (gave theirs back to its pool):
    a client can see the end of its connection before the agent finished with it."""
    with trio.fail_after(5):
        while pair.outbound.context.listener_counters("outbound:orders").active:
            await trio.sleep(0.005)


def handshakes(pair: Pair) -> tuple[int, int]:
    """(full, resumed) TLS handshakes the inbound did."""
    counters = pair.inbound.context.listener_counters("inbound:orders")
    return counters.tls_full, counters.tls_resumed


async def test_a_connection_between_agents_carries_one_stream_after_another(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(serve_count_then_reply)
    pair = await start_pair(nursery, tmp_path, app_port)
    for size in (100_000, 1, 300_000, 7):  # each needs half-close both ways
        assert await round_trip("127.0.0.1", pair.outbound_port, b"x" * size) == (
            f"got {size}".encode()
        )
        await settled(pair)
    assert handshakes(pair) == (1, 0)  # one connection between the agents, no new handshake
    counters = pair.inbound.context.listener_counters("inbound:orders")
    assert counters.accepted == 4 and counters.failed == 0  # every stream counts
    assert pair.outbound.context.counters.failed == 0


async def serve_greeting(*, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """An app that speaks first (like SMTP), then echoes one line and closes."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"220 hello\n")
            line = b""
            while not line.endswith(b"\n"):
                data = await stream.receive_some(1024)
                if not data:
                    return
                line += data
            await stream.send_all(b"250 " + line)

    await serve_app(handle, "127.0.0.1", task_status=task_status)


async def test_a_reused_connection_serves_an_app_that_speaks_first(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(serve_greeting)
    pair = await start_pair(nursery, tmp_path, app_port)
    for k in range(3):
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", pair.outbound_port)
            async with stream:
                assert await stream.receive_some(100) == b"220 hello\n"
                await stream.send_all(f"mail {k}\n".encode())
                got = b""
                while data := await stream.receive_some(100):
                    got += data
                assert got == f"250 mail {k}\n".encode()
        await settled(pair)
    assert handshakes(pair) == (1, 0)


async def test_a_pooled_connection_the_peer_closed_costs_the_client_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The called agent drains (or restarts) while the caller keeps its connection: the
    next client connection goes over a new one."""
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    assert await round_trip("127.0.0.1", pair.outbound_port, b"one") == b"one"
    await settled(pair)
    pair.inbound.context.drain.begin()  # closes the idle connection it waits on
    with trio.fail_after(5):
        while pair.inbound.context.listener_counters("inbound:orders").active:
            await trio.sleep(0.01)
    pair.inbound.context.drain.started = False  # ...and it is back
    assert await round_trip("127.0.0.1", pair.outbound_port, b"two") == b"two"
    assert handshakes(pair) == (1, 1)  # a new connection (its session resumed)
    assert pair.outbound.context.counters.failed == 0


async def test_an_agent_that_speaks_only_meshagent_1_is_still_served(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older agent on the other side: one connection per stream, as before."""
    old = functools.partial(_base_v1, meshagent_tls._base)
    monkeypatch.setattr(meshagent_tls, "_base", old)
    app_port = await nursery.start(serve_count_then_reply)
    pair = await start_pair(nursery, tmp_path, app_port)
    for size in (10, 20):
        assert await round_trip("127.0.0.1", pair.outbound_port, b"x" * size) == (
            f"got {size}".encode()
        )
    assert sum(handshakes(pair)) == 2


def _base_v1(base: Callable[[ssl.SSLContext, IdentityFiles], ssl.SSLContext],
             ctx: ssl.SSLContext, files: IdentityFiles) -> ssl.SSLContext:
    ctx = base(ctx, files)
    ctx.set_alpn_protocols(["meshagent/1"])
    return ctx


async def test_a_caller_no_longer_allowed_cannot_open_another_stream(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    assert await round_trip("127.0.0.1", pair.outbound_port, b"one") == b"one"
    await settled(pair)
    source = pair.inbound.context.source
    assert isinstance(source, StaticSource)
    source.current = msgspec.structs.replace(source.current, permissions={"orders": ()})
    answer = b"?"
    try:
        answer = await round_trip("127.0.0.1", pair.outbound_port, b"two", timeout=5)
    except* trio.BrokenResourceError:  # a reset: as good as a close here
        answer = b""
    assert answer == b""
    counters = pair.inbound.context.listener_counters("inbound:orders")
    assert counters.failures.get("unauthorized", 0) >= 1


async def start_inbound_of_one_and_two_callers(
    nursery: trio.Nursery, tmp_path: Path
) -> tuple[DataplaneHandle, list[int]]:
    """An echo app behind an inbound that holds at most one connection, and two calling
    agents, each with its own pool: (the inbound, the callers' ports)."""
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    ca = make_ca(tmp_path / "ca", MESH)
    inbound_port = free_port("127.0.0.2")
    inbound = await nursery.start(
        serve_dataplane,
        StaticSource(inbound_snapshot(app_port, inbound_port, max_connections=1)),
        TlsContexts({"orders": ca.issue("orders")}),
    )
    callers = []
    for _ in range(2):
        port = free_port()
        await nursery.start(
            serve_dataplane,
            StaticSource(outbound_snapshot(port, [("127.0.0.2", inbound_port)])),
            TlsContexts({"web": ca.issue("web")}),
        )
        callers.append(port)
    return inbound, callers


async def test_an_inbound_at_its_limit_closes_an_idle_meshagent2_connection_for_a_new_caller(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    inbound, callers = await start_inbound_of_one_and_two_callers(nursery, tmp_path)
    with trio.fail_after(10):  # without the reclaim, the second waits 90 s
        for port in (*callers, *callers):
            # each stream ends cleanly: its connection stays, idle, in both agents
            assert await round_trip("127.0.0.1", port, b"ping") == b"ping"
    counters = inbound.context.counters
    assert counters.failed == 0 and counters.accepted >= 4


async def test_an_inbound_at_its_limit_closes_the_first_connection_to_go_idle_for_a_caller(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A caller that comes while the only connection is busy gets it as soon as it goes
    idle: left open until its idle timeout (an hour here), it would hold the place past
    the caller's handshake timeout (2 s)."""
    _, callers = await start_inbound_of_one_and_two_callers(nursery, tmp_path)
    answers: list[bytes] = []

    async def second() -> None:
        answers.append(await round_trip("127.0.0.1", callers[1], b"pong"))

    with captured_log() as out, trio.fail_after(10):
        busy = await trio.open_tcp_stream("127.0.0.1", callers[0])
        await busy.send_all(b"ping")
        assert await busy.receive_some(4) == b"ping"  # the stream runs: not idle
        async with trio.open_nursery() as clients:
            clients.start_soon(second)
            while "connection limit reached" not in out.getvalue():
                await trio.sleep(0.01)  # the second waits in the inbound's backlog
            await busy.send_eof()  # the stream ends; its connection goes idle
            assert await busy.receive_some(1) == b""
            await busy.aclose()
    assert answers == [b"pong"]


async def test_a_burst_of_clients_connects_to_an_endpoint_a_few_at_a_time(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With mTLS, connects to one endpoint are bounded (here to one at a time): the
    clients past the bound wait in line for a connection another gives back, or the
    slot, and every one is served."""
    monkeypatch.setattr(pool_module, "MAX_CONNECTING_PER_KEY", 1)
    in_flight: list[int] = [0, 0]  # now, most at once
    connect = outbound_module.connect_endpoint

    async def counted(*args: Any) -> Any:
        in_flight[0] += 1
        in_flight[1] = max(in_flight)
        try:
            return await connect(*args)
        finally:
            in_flight[0] -= 1

    monkeypatch.setattr(outbound_module, "connect_endpoint", counted)
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    pair = await start_pair(nursery, tmp_path, app_port)
    await echo_at_once(pair.outbound_port, 12, 100)
    assert in_flight == [0, 1]
    assert pair.outbound.context.counters.failed == 0


async def test_a_client_in_line_past_a_connects_time_is_refused_as_busy_not_failed(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line lasts as long as a connect could (connect + handshake: 2 s here). A
    client still in line then is closed, counted busy and logged ``endpoint busy``; the
    endpoint is not reported failed (its connect in progress says how it went)."""
    monkeypatch.setattr(pool_module, "MAX_CONNECTING_PER_KEY", 1)
    holding, release = trio.Event(), trio.Event()
    connect = outbound_module.connect_endpoint

    async def first_held(*args: Any) -> Any:
        if not holding.is_set():  # the first connect keeps the only slot until released
            holding.set()
            await release.wait()
        return await connect(*args)

    monkeypatch.setattr(outbound_module, "connect_endpoint", first_held)
    app_port = await nursery.start(serve_echo, "127.0.0.1")
    ca = make_ca(tmp_path / "ca", MESH)
    inbound_port, outbound_port = free_port("127.0.0.2"), free_port()
    await nursery.start(
        serve_dataplane,
        StaticSource(inbound_snapshot(app_port, inbound_port)),
        TlsContexts({"orders": ca.issue("orders")}),
    )
    snapshot = msgspec.structs.replace(
        outbound_snapshot(outbound_port, [("127.0.0.2", inbound_port)]),
        timeouts=Timeouts(connect_seconds=1, handshake_seconds=1),
    )
    outbound = await nursery.start(
        serve_dataplane, StaticSource(snapshot), TlsContexts({"web": ca.issue("web")})
    )
    first: list[bytes] = []

    async def first_client() -> None:
        first.append(await round_trip("127.0.0.1", outbound_port, b"first"))

    with captured_log() as out:
        async with trio.open_nursery() as clients:
            clients.start_soon(first_client)
            with trio.fail_after(5):
                await holding.wait()
            answer = await first_answer(outbound_port, b"second")
            release.set()
    assert answer == b"" and first == [b"first"]
    assert outbound.context.listener_counters("outbound:orders").busy == 1
    assert 'event="endpoint busy"' in out.getvalue()
    assert 'event="endpoint failed"' not in out.getvalue()
