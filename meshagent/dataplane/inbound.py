"""handle_inbound: mesh -> local app. Terminate mTLS, check the caller, forward to the app."""

from __future__ import annotations

import trio

from meshagent.dataplane.connection import DataplaneContext, connection_boundary, peer_address
from meshagent.dataplane.errors import (
    HandshakeError,
    UpstreamConnectError,
    UpstreamTimeout,
    map_errors,
)
from meshagent.dataplane.tcp_proxy import FramedSide, PlainSide, RawTlsSide, Side, splice
from meshagent.dataplane.tls import check_peer
from meshagent.log import get_logger
from meshagent.protocol.frames import ALPN
from meshagent.snapshot.model import InboundListener

log = get_logger("inbound")


async def handle_inbound(
    stream: trio.SocketStream, listener: InboundListener, ctx: DataplaneContext
) -> None:
    """Serve one connection from another agent. Never raises (error boundary); a cancel point."""
    snapshot = ctx.source.current  # pinned for the life of this connection
    conn = next(ctx.ids)
    fields = {"conn": conn, "listener": listener.name, "peer": peer_address(stream)}
    timeouts = snapshot.timeouts
    tls = trio.SSLStream(stream, ctx.tls.server(listener.service), server_side=True)
    app: trio.SocketStream | None = None
    with connection_boundary(ctx, log, **fields):
        try:
            with map_errors(timeout=HandshakeError, failure=HandshakeError, what="tls handshake"):
                with trio.fail_after(timeouts.handshake_seconds):
                    await tls.do_handshake()
            caller = check_peer(tls.getpeercert(), mesh=snapshot.mesh, service=None)
            with map_errors(
                timeout=UpstreamTimeout,
                failure=UpstreamConnectError,
                what=f"connect app {listener.app_host}:{listener.app_port}",
            ):
                with trio.fail_after(timeouts.connect_seconds):
                    app = await trio.open_tcp_stream(listener.app_host, listener.app_port)
        except BaseException:
            await trio.aclose_forcefully(tls)
            raise
        framed = tls.selected_alpn_protocol() == ALPN
        mesh_side: Side = FramedSide(tls) if framed else RawTlsSide(tls)
        log.debug("accepted", caller=caller, **fields)
        sent, received = await splice(
            mesh_side, PlainSide(app), idle_seconds=timeouts.idle_seconds
        )
        ctx.counters.bytes_in += sent
        ctx.counters.bytes_out += received
        log.debug("closed", bytes_in=sent, bytes_out=received, **fields)
