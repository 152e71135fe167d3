"""serve_dataplane: own every listener and every connection of the agent.

Nursery layout (STYLE §2.4)::

    pump nursery          the C pump of L4 connections (nativepump.py), when available,
    │                     and the sweep of idle pooled connections (pool.sweep_forever)
    └── connections nursery   handler tasks; outlives the listeners so in-flight work drains
        └── listeners nursery one serve_listener task per inbound and outbound

``DataplaneHandle.drain(seconds)`` stops accepting at once and gives in-flight
connections ``seconds`` to finish before they are cancelled. HTTP keep-alive
connections close as soon as they are between requests, and idle pooled connections to
other agents close at once, so peers are not held until the deadline.
"""

from __future__ import annotations

import functools
import random
import socket
from dataclasses import dataclass

import trio

from meshagent.dataplane.connection import DataplaneContext, SnapshotSource
from meshagent.dataplane.http_outbound import HttpOutbound, handle_http_outbound
from meshagent.dataplane.inbound import AppPool, handle_inbound
from meshagent.dataplane.listener import Handler, open_listener, serve_listener
from meshagent.dataplane.nativepump import NativePump, native_problem
from meshagent.dataplane.outbound import handle_outbound, stream_pool
from meshagent.dataplane.pool import ConnectionPool, sweep_forever
from meshagent.dataplane.tls import TlsContexts
from meshagent.log import get_logger
from meshagent.routing.balance import EndpointBalancer
from meshagent.snapshot.model import InboundListener, OutboundListener

log = get_logger("dataplane")


@dataclass(slots=True)
class DataplaneHandle:
    context: DataplaneContext
    _listeners: trio.CancelScope
    _connections: trio.CancelScope

    def stop_accepting(self) -> None:
        self._listeners.cancel()

    def drain(self, seconds: float) -> None:
        """Stop accepting; cancel connections still open ``seconds`` from now. Not async."""
        self.stop_accepting()
        self.context.drain.begin()
        self._connections.deadline = min(self._connections.deadline, trio.current_time() + seconds)


def _inbound_handler(spec: InboundListener, ctx: DataplaneContext) -> Handler:
    app = AppPool(spec, ctx) if spec.protocol == "http" else None
    if app is not None:
        ctx.pools[spec.name] = app.pool
    # A partial, not a closure: no coroutine frame of its own held per connection.
    return functools.partial(handle_inbound, listener=spec, ctx=ctx, app=app)


def _outbound_handler(spec: OutboundListener, ctx: DataplaneContext) -> Handler:
    if spec.protocol == "http":
        http = HttpOutbound(spec, ctx)
        ctx.pools[spec.name] = http.pool
        return functools.partial(handle_http_outbound, listener=spec, ctx=ctx, state=http)
    balancer = EndpointBalancer()
    seen_version = -1
    pool = stream_pool()
    ctx.pools[spec.name] = pool

    async def handle(sock: socket.socket) -> None:
        nonlocal seen_version
        snapshot = ctx.source.current
        if snapshot.version != seen_version:  # the catalog changed: drop stale ejections
            balancer.forget([e for eps in snapshot.endpoints.values() for e in eps])
            seen_version = snapshot.version
        await handle_outbound(sock, spec, ctx, balancer, pool)

    return handle


async def serve_dataplane(
    source: SnapshotSource,
    tls: TlsContexts,
    *,
    rng: random.Random | None = None,
    reuse_port: bool = False,
    task_status: trio.TaskStatus[DataplaneHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind every listener of ``source.current``, then serve until drained. A cancel point.

    ``task_status.started(handle)`` comes once every listener is bound. ``reuse_port``:
    bind with SO_REUSEPORT, so worker processes can bind the same addresses.

    Raises:
        BindError: a listener could not bind (before ``started``; nothing stays bound).
    """
    ctx = DataplaneContext(source=source, tls=tls, rng=rng or random.Random())
    snapshot = source.current
    specs: list[tuple[InboundListener | OutboundListener, Handler]] = [
        (spec, _inbound_handler(spec, ctx)) for spec in snapshot.inbounds
    ]
    specs += [(spec, _outbound_handler(spec, ctx)) for spec in snapshot.outbounds]
    # the handlers' pools of idle keep-alive connections (ctx.pools), closed at the end
    pools = list(ctx.pools.values())
    bound: list[socket.socket] = []
    try:
        for spec, _ in specs:
            bound.append(
                await open_listener(spec.name, spec.bind, spec.port, reuse_port=reuse_port)
            )
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    try:
        async with trio.open_nursery() as pump_nursery:  # outlives every connection
            problem = native_problem()
            if problem is None:
                ctx.pump = await pump_nursery.start(NativePump().run)
            log.info("l4 pump", kind="native" if problem is None else "python", why=problem)
            pump_nursery.start_soon(sweep_forever, pools)
            await _serve(specs, bound, ctx, pools, task_status)
            pump_nursery.cancel_scope.cancel()
    finally:
        for pool in pools:
            pool.close()
    log.info("drained", accepted=ctx.counters.accepted, failed=ctx.counters.failed)


async def _serve(
    specs: list[tuple[InboundListener | OutboundListener, Handler]],
    bound: list[socket.socket],
    ctx: DataplaneContext,
    pools: list[ConnectionPool],
    task_status: trio.TaskStatus[DataplaneHandle],
) -> None:
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as listeners:
            for (spec, handler), listener in zip(specs, bound, strict=True):
                await listeners.start(
                    lambda task_status, s=spec, h=handler, lst=listener: serve_listener(
                        s.name,
                        lst,
                        h,
                        connections,
                        max_connections=s.max_connections,
                        reclaim=ctx.drain,
                        task_status=task_status,
                    )
                )
                log.info("listening", listener=spec.name, address=f"{spec.bind}:{spec.port}")
            task_status.started(
                DataplaneHandle(ctx, listeners.cancel_scope, connections.cancel_scope)
            )
        log.info("stopped accepting", active=ctx.counters.active)
        for pool in pools:  # peers holding our idle connections can finish draining too
            pool.close_idle()
