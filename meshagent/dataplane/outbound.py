"""handle_outbound: local app -> mesh. Pick a backend (the outbound's route: a weighted
split over service subsets, chosen once per connection), then an endpoint of it, open
mTLS to its agent (or take an idle connection to it from the listener's pool), splice.

Between agents that speak ``meshagent/2`` (protocol/frames.py) a connection carries one
stream after another: each starts with OPEN, answered by OPENED once the called agent
reached its app. After a stream ended cleanly (END both ways) the connection goes back
to the listener's pool (``stream_pool``) and the next client connection to that
endpoint skips the TCP connect and the TLS handshake. A pooled connection that fails
before OPENED cost the client nothing (none of its bytes were sent): the next one, or a
new connection, is tried.
"""

from __future__ import annotations

import functools
import random
import socket
from collections.abc import Hashable

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
from meshagent.dataplane.plainsocket import PlainSocketStream, open_tcp
from meshagent.dataplane.pool import ConnectionPool, PoolTimeout, Upstream
from meshagent.dataplane.sslsocket import SslSocketStream
from meshagent.dataplane.tcp_proxy import (
    FramedSide,
    PlainSide,
    RawTlsSide,
    Side,
    receive_control,
    splice,
)
from meshagent.dataplane.tls import check_peer
from meshagent.log import get_logger
from meshagent.protocol.frames import ALPN, ALPN_STREAMS, OPEN_FRAME, OPENED, FrameError
from meshagent.routing.balance import EndpointBalancer
from meshagent.routing.split import choose_backend, subset
from meshagent.snapshot.model import Backend, Endpoint, HttpMatch, OutboundListener, Snapshot

log = get_logger("outbound")

# How many endpoints one client connection may try before it is refused.
CONNECT_ATTEMPTS = 3

# Idle connections to other agents a TCP outbound keeps for its next streams. An idle
# one is given up after POOL_IDLE_SECONDS, well before the called agent stops waiting
# for its next OPEN (inbound.STREAM_IDLE_SECONDS), so the two rarely race.
POOL_IDLE_SECONDS = 30.0
POOL_PER_ENDPOINT = 64
POOL_MAX_IDLE = 512


def stream_pool() -> ConnectionPool:
    """The pool of one TCP outbound listener (``meshagent/2`` connections)."""
    return ConnectionPool(
        None,
        max_idle_per_key=POOL_PER_ENDPOINT,
        max_idle=POOL_MAX_IDLE,
        idle_seconds=POOL_IDLE_SECONDS,
    )


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
            tcp = await open_tcp(endpoint.host, endpoint.port)
    if snapshot.mtls == "off":
        return PlainSocketStream(tcp)
    context = ctx.tls.client(listener.source)
    peer = endpoint.address
    offered = ctx.tls.session(context, listener.source, peer)
    tls = SslSocketStream.wrap(tcp, context, server_side=False, session=offered)
    try:
        with map_errors(timeout=UpstreamTimeout, failure=HandshakeError, what=f"handshake {where}"):
            with trio.fail_after(timeouts.handshake_seconds):
                await tls.do_handshake()
        check_peer(tls.getpeercert(), mesh=snapshot.mesh, service=endpoint.service)
    except BaseException:
        ctx.tls.forget_session(listener.source, peer)
        tls.close()
        raise
    refused = offered is not None and not tls.session_reused
    if ctx.tls.wants_session(context, listener.source, peer, refused=refused):
        tls.keep_session_with(
            functools.partial(ctx.tls.keep_session, context, listener.source, peer)
        )
    return tls


async def handle_outbound(
    sock: socket.socket,
    listener: OutboundListener,
    ctx: DataplaneContext,
    balancer: EndpointBalancer,
    pool: ConnectionPool | None = None,
) -> None:
    """Serve one connection from the local app. Never raises (error boundary); a cancel point.

    ``pool``: the listener's idle ``meshagent/2`` connections (None: none kept)."""
    snapshot = ctx.source.current  # pinned for the life of this connection
    conn = next(ctx.ids)
    client = peer_address(sock)
    fields = {"conn": conn, "listener": listener.name, "client": client}
    with connection_boundary(ctx, log, listener.name, conn=conn, client=client) as counters:
        try:
            upstream, endpoint, key = await _connect_any(
                listener, snapshot, ctx, balancer, fields, pool
            )
        except BaseException:
            sock.close()
            raise
        mesh_side: Side
        if isinstance(upstream, PlainSocketStream):
            mesh_side = PlainSide(upstream)
        elif (alpn := upstream.selected_alpn_protocol()) in (ALPN, ALPN_STREAMS):
            mesh_side = FramedSide(upstream, keep=key is not None and alpn == ALPN_STREAMS)
        else:
            mesh_side = RawTlsSide(upstream)
        log.debug("connected", endpoint=endpoint.address, **fields)
        kept = False
        try:
            sent, received = await splice(
                PlainSide(PlainSocketStream(sock)), mesh_side,
                idle_seconds=snapshot.idle_seconds(endpoint.service), pump=ctx.pump,
            )
            if pool is not None and isinstance(mesh_side, FramedSide) and mesh_side.keep:
                kept = mesh_side.reusable
                if kept:
                    pool.release(key, upstream)
        finally:
            if isinstance(mesh_side, FramedSide) and mesh_side.keep and not kept:
                upstream.close()  # splice left it open
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
    pool: ConnectionPool | None,
) -> tuple[Upstream, Endpoint, Hashable | None]:
    """A connection to an endpoint of the chosen backend, ready for this client's bytes,
    and its pool key (None: not to be pooled)."""
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
            upstream, key = await _stream_to(endpoint, listener, snapshot, ctx, pool, fields)
        except PoolTimeout as exc:  # busy, not failed: the connects in progress tell
            ctx.listener_counters(listener.name).busy += 1
            log.warning("endpoint busy", endpoint=endpoint.address, error=str(exc), **fields)
            last = exc
            continue
        except DataplaneError as exc:
            balancer.report_failure(endpoint, trio.current_time())
            log.warning("endpoint failed", endpoint=endpoint.address, error=str(exc), **fields)
            last = exc
            continue
        balancer.report_success(endpoint)
        return upstream, endpoint, key
    if last is not None:
        raise NoEndpoints(
            f"{backend.label()}: {len(tried)} endpoint(s) failed or busy, last: {last}"
        )
    raise NoEndpoints(f"{backend.label()}: no healthy endpoint in the mesh {snapshot.mesh!r}")


async def _stream_to(
    endpoint: Endpoint,
    listener: OutboundListener,
    snapshot: Snapshot,
    ctx: DataplaneContext,
    pool: ConnectionPool | None,
    fields: dict[str, object],
) -> tuple[Upstream, Hashable | None]:
    """A connection to ``endpoint`` ready for one stream, and its pool key: an idle one
    from ``pool`` that answered OPEN, else a new one (which, speaking ``meshagent/2``,
    answered OPEN too). A cancel point.

    With mTLS, connects to one endpoint are bounded as the HTTP outbounds' are
    (``pool.MAX_CONNECTING_PER_KEY`` at once): past the bound a client connection
    waits in line, as long as a connect of its own could take, for a connection
    another client gives back or a connect slot (a burst of clients would otherwise
    start a TLS handshake each at once, and the called agent would time most out).

    Raises:
        as ``connect_endpoint``; UpstreamConnectError, UpstreamTimeout: the new
        connection's agent did not open the stream (its app is down, or it refused us);
        PoolTimeout: the endpoint's connect slots stayed taken that long.
    """
    key: Hashable | None = None
    if pool is None or snapshot.mtls == "off":
        upstream = await connect_endpoint(endpoint, listener, snapshot, ctx)
    else:
        key = (listener.source, endpoint.address, ctx.tls.client(listener.source))
        wait = snapshot.connection_seconds(endpoint.service)
        connect = functools.partial(connect_endpoint, endpoint, listener, snapshot, ctx)
        while True:
            upstream, reused = await pool.acquire(key, wait_seconds=wait, connect=connect)
            if not reused:
                break
            assert isinstance(upstream, SslSocketStream)
            try:
                if await _open_stream(upstream, endpoint, snapshot):
                    return upstream, key
                log.debug("pooled connection was closed", endpoint=endpoint.address, **fields)
            except UpstreamTimeout:  # the agent is there but slow: a new connection won't help
                upstream.close()
                raise
            except DataplaneError as exc:  # nothing of the client's was sent: try another
                log.debug("pooled connection failed", endpoint=endpoint.address,
                          error=str(exc), **fields)
            upstream.close()
    if isinstance(upstream, SslSocketStream) and upstream.selected_alpn_protocol() == ALPN_STREAMS:
        try:
            if not await _open_stream(upstream, endpoint, snapshot):
                raise UpstreamConnectError(
                    f"{endpoint.service} at {endpoint.address} closed the stream before "
                    "opening it (its app is down, or it does not allow us: see its log)"
                )
        except BaseException:
            upstream.close()
            raise
    return upstream, key


async def _open_stream(tls: SslSocketStream, endpoint: Endpoint, snapshot: Snapshot) -> bool:
    """Send OPEN and wait for OPENED; False when the peer closed the connection instead.
    A cancel point.

    Raises:
        UpstreamConnectError (a broken connection or bad frame), UpstreamTimeout.
    """
    where = f"{endpoint.service} at {endpoint.address}"
    seconds = snapshot.connection_seconds(endpoint.service)
    with map_errors(timeout=UpstreamTimeout, failure=UpstreamConnectError, what=f"open {where}"):
        with trio.fail_after(seconds):
            await tls.send_all(OPEN_FRAME)
            try:
                return await receive_control(tls, OPENED)
            except FrameError as exc:
                raise UpstreamConnectError(f"open {where}: {exc}") from None
