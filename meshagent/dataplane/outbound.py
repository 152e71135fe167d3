"""handle_outbound: local app -> mesh. Pick a backend (the outbound's route: a weighted
split over service subsets, chosen once per connection), then an endpoint of it, open
mTLS to its agent, splice."""

from __future__ import annotations

import functools
import random

import trio

from meshagent.dataplane.connection import DataplaneContext, connection_boundary, peer_address
from meshagent.dataplane.errors import (
    DataplaneError,
    HandshakeError,
    NoEndpoints,
    UpstreamConnectError,
    UpstreamTimeout,
    map_errors,
)
from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.sslsocket import SslSocketStream
from meshagent.dataplane.tcp_proxy import FramedSide, PlainSide, RawTlsSide, Side, splice
from meshagent.dataplane.tls import check_peer
from meshagent.log import get_logger
from meshagent.protocol.frames import ALPN
from meshagent.routing.balance import EndpointBalancer
from meshagent.routing.split import choose_backend, subset
from meshagent.snapshot.model import Backend, Endpoint, HttpMatch, OutboundListener, Snapshot

log = get_logger("outbound")

# How many endpoints one client connection may try before it is refused.
CONNECT_ATTEMPTS = 3


async def connect_endpoint(
    endpoint: Endpoint, listener: OutboundListener, snapshot: Snapshot, ctx: DataplaneContext
) -> SslSocketStream | PlainSocketStream:
    """TCP connect + mTLS handshake + identity check, each under its deadline (plain TCP
    only when the mesh's mTLS mode is ``off``). The handshake resumes the last session
    with this endpoint when there is one (``TlsContexts.session``). A cancel point.

    Raises:
        UpstreamConnectError, UpstreamTimeout, HandshakeError, Unauthorized.
    """
    timeouts = snapshot.timeouts
    where = f"{endpoint.service} at {endpoint.address}"
    with map_errors(timeout=UpstreamTimeout, failure=UpstreamConnectError, what=f"connect {where}"):
        with trio.fail_after(snapshot.connect_seconds(endpoint.service)):
            tcp = await trio.open_tcp_stream(endpoint.host, endpoint.port)
    if snapshot.mtls == "off":
        return PlainSocketStream.wrap(tcp)
    context = ctx.tls.client(listener.source)
    peer = endpoint.address
    offered = ctx.tls.session(context, listener.source, peer)
    try:
        tls = SslSocketStream.wrap(tcp, context, server_side=False, session=offered)
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    try:
        with map_errors(timeout=UpstreamTimeout, failure=HandshakeError, what=f"handshake {where}"):
            with trio.fail_after(timeouts.handshake_seconds):
                await tls.do_handshake()
        check_peer(tls.getpeercert(), mesh=snapshot.mesh, service=endpoint.service)
    except BaseException:
        ctx.tls.forget_session(listener.source, peer)
        await trio.aclose_forcefully(tls)
        raise
    refused = offered is not None and not tls.session_reused
    if ctx.tls.wants_session(context, listener.source, peer, refused=refused):
        tls.keep_session_with(
            functools.partial(ctx.tls.keep_session, context, listener.source, peer)
        )
    return tls


async def handle_outbound(
    stream: trio.SocketStream,
    listener: OutboundListener,
    ctx: DataplaneContext,
    balancer: EndpointBalancer,
) -> None:
    """Serve one connection from the local app. Never raises (error boundary); a cancel point."""
    snapshot = ctx.source.current  # pinned for the life of this connection
    conn = next(ctx.ids)
    client = peer_address(stream)
    fields = {"conn": conn, "listener": listener.name, "client": client}
    with connection_boundary(ctx, log, listener.name, conn=conn, client=client) as counters:
        try:
            upstream, endpoint = await _connect_any(listener, snapshot, ctx, balancer, fields)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        mesh_side: Side
        if isinstance(upstream, PlainSocketStream):
            mesh_side = PlainSide(upstream)
        elif upstream.selected_alpn_protocol() == ALPN:
            mesh_side = FramedSide(upstream)
        else:
            mesh_side = RawTlsSide(upstream)
        log.debug("connected", endpoint=endpoint.address, **fields)
        sent, received = await splice(
            PlainSide(stream), mesh_side,
            idle_seconds=snapshot.idle_seconds(endpoint.service), pump=ctx.pump,
        )
        counters.bytes_out += sent
        counters.bytes_in += received
        log.debug("closed", bytes_out=sent, bytes_in=received, **fields)


def tcp_backend(listener: OutboundListener, snapshot: Snapshot, rng: random.Random) -> Backend:
    """The backend of one TCP connection: the outbound's first rule that matches anything
    (a route's default, or a rule without conditions), split by weight; with no such
    rule, the outbound's own service."""
    routes = snapshot.routes.get(listener.service)
    for rule in routes.rules if routes is not None else ():
        if rule.match == _ANY:
            return choose_backend(rule.backends, rng)
    return Backend(service=listener.service)


_ANY = HttpMatch()


async def _connect_any(
    listener: OutboundListener,
    snapshot: Snapshot,
    ctx: DataplaneContext,
    balancer: EndpointBalancer,
    fields: dict[str, object],
) -> tuple[SslSocketStream | PlainSocketStream, Endpoint]:
    backend = tcp_backend(listener, snapshot, ctx.rng)
    endpoints = subset(snapshot.endpoints_of(backend.service), backend)
    tried: list[Endpoint] = []
    last: DataplaneError | None = None
    for _ in range(CONNECT_ATTEMPTS):
        endpoint = balancer.pick(endpoints, trio.current_time(), exclude=tried)
        if endpoint is None:
            break
        tried.append(endpoint)
        try:
            upstream = await connect_endpoint(endpoint, listener, snapshot, ctx)
        except DataplaneError as exc:
            balancer.report_failure(endpoint, trio.current_time())
            log.warning("endpoint failed", endpoint=endpoint.address, error=str(exc), **fields)
            last = exc
            continue
        balancer.report_success(endpoint)
        return upstream, endpoint
    if last is not None:
        raise NoEndpoints(f"{backend.label()}: {len(tried)} endpoint(s) failed, last: {last}")
    raise NoEndpoints(f"{backend.label()}: no healthy endpoint in the mesh {snapshot.mesh!r}")
