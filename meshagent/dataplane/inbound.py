"""handle_inbound: mesh -> local app. Terminate mTLS, check the caller, forward to the app.

The mesh's mTLS mode decides what a caller may speak:

* ``strict``: mTLS only; anything else is dropped at the handshake.
* ``permissive`` (the migration step) and ``off``: the first bytes decide
  (``protocol.detect``): a TLS handshake goes the mTLS way, with the same checks as in
  strict mode; anything else is plaintext, passed to the app as it is. A client that
  says nothing for ``DETECT_SECONDS`` (a server-speaks-first protocol) is plaintext.

A TCP caller that speaks ``meshagent/2`` keeps its connection for its next streams:
``_serve_streams`` serves them one after another (protocol/frames.py, outbound.py).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Hashable

import trio

from meshagent.dataplane.connection import (
    ConnectionCounters,
    DataplaneContext,
    connection_boundary,
    peer_address,
)
from meshagent.dataplane.errors import (
    DataplaneError,
    HandshakeError,
    Unauthorized,
    UpstreamConnectError,
    UpstreamTimeout,
    map_errors,
)
from meshagent.dataplane.http_proxy import (
    SOURCE_HEADER,
    Forward,
    Relay,
    RelaySession,
    Release,
    Respond,
    StartFailure,
    Stream,
    mesh_request_headers,
    serve_http,
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
from meshagent.protocol.detect import Detected, detect
from meshagent.protocol.frames import ALPN, ALPN_STREAMS, OPEN, OPENED_FRAME
from meshagent.protocol.headers import get_header
from meshagent.protocol.http1 import RequestHead
from meshagent.snapshot.model import InboundListener, Snapshot, is_ip_address

log = get_logger("inbound")

# How long a permissive inbound waits for a caller's first bytes before it treats the
# connection as plaintext (mesh agents always speak first: a TLS ClientHello).
DETECT_SECONDS = 1.0
# How long a meshagent/2 connection may wait for the caller's next stream (OPEN). Longer
# than the caller keeps it idle in its pool (outbound.POOL_IDLE_SECONDS).
STREAM_IDLE_SECONDS = 90.0
# A caller's service name the C relay writes into x-meshagent-source as is.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DETECT_BYTES = 2  # detect() decides on the first two bytes (a TLS record header's)
_PEEK_RETRY_SECONDS = 0.005


async def _detect(sock: socket.socket) -> Detected:
    """What the caller speaks, from its first bytes, looked at with ``MSG_PEEK``: they
    stay in the socket, so the TLS layer (which reads the descriptor itself) or the app
    still gets them. A cancel point.

    Raises:
        OSError: the socket failed.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    seen = 0
    with trio.move_on_after(DETECT_SECONDS):
        while True:
            try:
                prefix = sock.recv(_DETECT_BYTES, socket.MSG_PEEK)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            kind = detect(prefix)
            if kind is not Detected.NEED_MORE or not prefix:
                return kind  # NEED_MORE with nothing: the caller closed; plaintext
            if len(prefix) == seen:
                # The socket stays readable with the bytes peeked before: wait a little
                # for the rest of the record header instead of spinning.
                await trio.sleep(_PEEK_RETRY_SECONDS)
            seen = len(prefix)
    return Detected.PLAINTEXT


class AppPool:
    """Idle keep-alive connections to the local app of one HTTP inbound."""

    def __init__(self, listener: InboundListener, ctx: DataplaneContext) -> None:
        self.listener = listener
        self.ctx = ctx
        self.pool = ConnectionPool(self._connect)
        # the C relay connects an app by IP address only (a name needs the resolver)
        self.by_address = is_ip_address(listener.app_host)

    async def _connect(self, key: Hashable) -> Upstream:
        seconds = self.ctx.source.current.timeouts.connect_seconds
        return await _connect_app(self.listener, seconds)

    async def acquire(self, *, wait: bool = True) -> tuple[Upstream, bool]:
        """A connection to the app, waiting at most the connect timeout (as long as a
        connect of its own could take) for one when the pool's connect slots are all
        taken; with ``wait`` False, PoolTimeout at once then. Raises DataplaneError."""
        seconds = self.ctx.source.current.timeouts.connect_seconds if wait else 0.0
        return await self.pool.acquire("app", wait_seconds=seconds)

    def idle(self) -> Upstream | None:
        """An idle pooled connection to the app, or None: no connect, no wait."""
        return self.pool.take("app")

    def releaser(self, upstream: Upstream) -> Release:
        """What gives ``upstream`` back after a request: to the pool, or closed."""
        return self.pool.releaser("app", upstream)


async def _serve_app_http(
    downstream: trio.abc.Stream,
    source: str | None,
    app: AppPool,
    fields: dict[str, object],
) -> None:
    listener = app.listener
    start_failure = StartFailure()

    def base_labels() -> dict[str, str]:
        labels = {"mesh": app.ctx.source.current.mesh, "destination": listener.service}
        if source is not None:
            labels["source"] = source
        return labels

    async def decide(head: RequestHead, tried: tuple[Hashable, ...]) -> Forward | Respond:
        labels = base_labels()
        request_id = get_header(head.headers, b"x-request-id")
        if request_id is not None:
            labels["request_id"] = request_id.decode("latin-1")
        failed = start_failure.take()
        if failed is not None:  # the relay's start just failed to connect, for this request
            return Respond(502, f"{listener.service}: {failed[1]}", labels)
        try:
            upstream, _ = await app.acquire()
        except PoolTimeout as exc:  # the app is slow to accept: busy, not broken
            app.ctx.listener_counters(listener.name).busy += 1
            return Respond(503, f"{listener.service}: {exc}", labels)
        except DataplaneError as exc:
            return Respond(502, f"{listener.service}: {exc}", labels)
        return Forward(
            upstream=upstream,
            release=app.releaser(upstream),
            target=head.target,
            headers=mesh_request_headers(head, source=source),
            labels=labels,
        )

    # The C relay makes of a plain request what decide does: mesh_request_headers.
    add = b"" if source is None else SOURCE_HEADER + b": " + source.encode() + b"\r\n"

    async def start(current: RelaySession | None, *, connect: bool = True) -> RelaySession | None:
        start_failure.clear()
        if connect:
            try:
                # Not in line: when the app is busy the request waits in decide, once.
                upstream, _ = await app.acquire(wait=False)
            except PoolTimeout:
                return None  # decide waits in line
            except DataplaneError as exc:
                start_failure.record("app", exc)
                return None  # decide answers the request with why
        elif (idle := app.idle()) is not None:
            upstream = idle
        else:
            return None  # connected once the request begins
        return RelaySession(upstream, app.releaser(upstream), base_labels(), add)

    relay = None
    if source is None or _SERVICE_NAME.fullmatch(source):
        relay = Relay(start, drop=(SOURCE_HEADER,), reconnect=_AppReconnect(app, start_failure))

    await serve_http(
        downstream,
        decide,
        idle_seconds=app.ctx.source.current.timeouts.idle_seconds,
        head_seconds=app.ctx.source.current.timeouts.request_head_seconds,
        stats=app.ctx.http,
        log_fields=fields,
        drain=app.ctx.drain,
        listener=listener.name,
        pump=app.ctx.pump,
        relay=relay,
    )


class _AppReconnect:
    """The C relay connects the app again itself when an answer closed the app's
    connection (an app with keep-alive off): ``http_proxy.Reconnect``."""

    __slots__ = ("_app", "_failure")

    def __init__(self, app: AppPool, failure: StartFailure) -> None:
        self._app = app
        self._failure = failure

    def address(self) -> tuple[str, int, float] | None:
        if not self._app.by_address:  # a name: the relay ends, start connects (resolver)
            return None
        listener = self._app.listener
        seconds = self._app.ctx.source.current.timeouts.connect_seconds
        return listener.app_host, listener.app_port, seconds

    def adopt(self, fd: int, spent: RelaySession) -> RelaySession:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        upstream = PlainSocketStream(sock)
        return RelaySession(upstream, self._app.releaser(upstream), spent.labels, spent.add)

    def failed(self, why: str) -> None:
        listener = self._app.listener
        what = f"connect app {listener.app_host}:{listener.app_port}: {why}"
        error = UpstreamTimeout(what) if why == "timed out" else UpstreamConnectError(what)
        self._failure.record("app", error)


async def _deny_http(
    stream: Stream, reason: str, fields: dict[str, object], head_seconds: float
) -> None:
    """Answer the first request of a caller no TrafficPermission allows with 403 and the
    reason (its app sees why, not a bare reset), then let the connection close."""

    async def deny(head: RequestHead, tried: tuple[Hashable, ...]) -> Respond:
        return Respond(403, reason, close=True)

    with trio.move_on_after(head_seconds):
        await serve_http(
            stream, deny, idle_seconds=head_seconds, head_seconds=head_seconds,
            log_fields=fields,
        )


async def handle_inbound(
    sock: socket.socket,
    listener: InboundListener,
    ctx: DataplaneContext,
    app: AppPool | None = None,
) -> None:
    """Serve one connection from another agent (or, unless strict, a plaintext client).
    Never raises (error boundary); a cancel point."""
    snapshot = ctx.source.current  # pinned for the life of this connection
    conn = next(ctx.ids)
    fields = {"conn": conn, "peer": peer_address(sock)}
    timeouts = snapshot.timeouts
    with connection_boundary(ctx, log, listener.name, **fields) as counters:
        kind = Detected.TLS
        if snapshot.mtls != "strict":
            with map_errors(timeout=HandshakeError, failure=HandshakeError, what="detect"):
                kind = await _detect(sock)
        mesh_side: Side
        if kind is Detected.TLS:
            with map_errors(timeout=HandshakeError, failure=HandshakeError, what="handshake"):
                # Takes the descriptor: ``sock`` owns none from here on.
                tls = SslSocketStream.wrap(sock, ctx.tls.server(listener.service), server_side=True)
            try:
                with (
                    map_errors(timeout=HandshakeError, failure=HandshakeError, what="handshake"),
                    trio.fail_after(timeouts.handshake_seconds),
                ):
                    await tls.do_handshake()
                if tls.session_reused:
                    counters.tls_resumed += 1
                else:
                    counters.tls_full += 1
                caller = check_peer(tls.getpeercert(), mesh=snapshot.mesh, service=None)
                source = caller.rsplit("/", 1)[-1]
                denied = _refusal(snapshot, source, listener.service)
                if denied is not None:
                    if app is not None:  # say why to the caller's app, then close
                        await _deny_http(tls, str(denied), fields, timeouts.request_head_seconds)
                    raise denied
            except BaseException:
                tls.close()
                raise
            if app is not None:  # HTTP: requests over the TLS session
                try:
                    await _serve_app_http(tls, source, app, fields)
                finally:
                    tls.close()
                return
            alpn = tls.selected_alpn_protocol()
            if alpn == ALPN_STREAMS:
                await _serve_streams(tls, listener, ctx, counters, source, fields)
                return
            mesh_side = FramedSide(tls) if alpn == ALPN else RawTlsSide(tls)
        else:
            caller = "plaintext"
            counters.plaintext += 1
            if app is not None:
                plain = PlainSocketStream(sock)
                try:
                    await _serve_app_http(plain, None, app, fields)
                finally:
                    plain.close()
                return
            mesh_side = PlainSide(PlainSocketStream(sock))
        try:
            app_stream = await _connect_app(listener, timeouts.connect_seconds)
        except BaseException:
            await mesh_side.aclose()
            raise
        log.debug("accepted", caller=caller, listener=listener.name, **fields)
        sent, received = await splice(
            mesh_side, PlainSide(app_stream), idle_seconds=timeouts.idle_seconds, pump=ctx.pump
        )
        counters.bytes_in += sent
        counters.bytes_out += received
        log.debug("closed", bytes_in=sent, bytes_out=received, listener=listener.name, **fields)


def _refusal(snapshot: Snapshot, source: str, service: str) -> Unauthorized | None:
    """Why ``source`` may not call ``service`` under ``snapshot``'s permissions, or None."""
    if snapshot.may_call(source, service):
        return None
    return Unauthorized(f"{source} may not call {service}: no TrafficPermission allows it")


async def _connect_app(listener: InboundListener, seconds: float) -> PlainSocketStream:
    """Connect to the app behind ``listener``. A cancel point.

    Raises:
        UpstreamConnectError, UpstreamTimeout.
    """
    with map_errors(
        timeout=UpstreamTimeout,
        failure=UpstreamConnectError,
        what=f"connect app {listener.app_host}:{listener.app_port}",
    ):
        with trio.fail_after(seconds):
            return PlainSocketStream(await open_tcp(listener.app_host, listener.app_port))


async def _serve_streams(
    tls: SslSocketStream,
    listener: InboundListener,
    ctx: DataplaneContext,
    counters: ConnectionCounters,
    source: str,
    fields: dict[str, object],
) -> None:
    """``meshagent/2``: the caller's streams on this connection, one after another. Each
    starts with OPEN and gets OPENED once the app is connected (the first was allowed by
    the caller's handshake; the next ones are checked against the policies in force).
    Ends when the caller closes the connection, it waits STREAM_IDLE_SECONDS for the next
    stream, the agent drains, the listener at its connection limit needs the room
    (``Drain.reclaim``), or a stream does not end cleanly. Closes ``tls``."""
    try:
        first = True
        while True:
            with (
                trio.move_on_after(STREAM_IDLE_SECONDS) as waiting,
                ctx.drain.idle(waiting, listener.name),
            ):
                opened = await receive_control(tls, OPEN)
            if waiting.cancelled_caught or not opened:
                return
            snapshot = ctx.source.current
            if not first:
                counters.accepted += 1
                denied = _refusal(snapshot, source, listener.service)
                if denied is not None:
                    raise denied
            first = False
            timeouts = snapshot.timeouts
            app_stream = await _connect_app(listener, timeouts.connect_seconds)
            try:
                await tls.send_all(OPENED_FRAME)
            except BaseException:
                app_stream.close()
                raise
            mesh_side = FramedSide(tls, keep=True)
            sent, received = await splice(
                mesh_side, PlainSide(app_stream), idle_seconds=timeouts.idle_seconds,
                pump=ctx.pump,
            )
            counters.bytes_in += sent
            counters.bytes_out += received
            log.debug("stream closed", bytes_in=sent, bytes_out=received,
                      listener=listener.name, **fields)
            if not mesh_side.reusable:
                return
    finally:
        tls.close()
