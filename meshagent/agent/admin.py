"""The agent's admin endpoint: a tiny HTTP/1.1 server (h11) on loopback.

    GET /ready      200 "ready" once the data path serves, 503 before
    GET /stats      connection counters per listener (JSON)
    GET /snapshot   the snapshot in force (JSON)
    GET /metrics    Prometheus text exposition

Every read has a deadline and each connection serves at most ``MAX_REQUESTS`` requests,
so a stuck or greedy client costs one task for a bounded time.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import h11
import trio
from prometheus_client import CollectorRegistry

from meshagent.agent.metrics import exposition
from meshagent.dataplane.connection import DataplaneContext
from meshagent.log import get_logger
from meshagent.snapshot import codec

log = get_logger("admin")

READ_TIMEOUT_SECONDS = 10.0
MAX_REQUESTS = 100
MAX_CONNECTIONS = 64


class AdminState:
    """What the admin endpoint reports; filled in as the agent starts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.dataplane: DataplaneContext | None = None


Response = tuple[int, bytes, bytes]  # status, content type, body


async def _route(state: AdminState, method: bytes, target: bytes) -> Response:
    if method not in (b"GET", b"HEAD"):
        return 405, b"text/plain", b"only GET\n"
    path = target.split(b"?", 1)[0]
    context = state.dataplane
    if path == b"/ready":
        ready = context is not None
        return (200, b"text/plain", b"ready\n") if ready else (503, b"text/plain", b"starting\n")
    if path == b"/metrics":
        body = await exposition(state.registry)
        return 200, b"text/plain; version=0.0.4; charset=utf-8", body
    if context is None:
        return 503, b"text/plain", b"starting\n"
    if path == b"/stats":
        stats = {name: asdict(c) for name, c in sorted(context.by_listener.items())}
        return 200, b"application/json", json.dumps(stats, indent=1).encode() + b"\n"
    if path == b"/snapshot":
        return 200, b"application/json", codec.encode(context.source.current) + b"\n"
    return 404, b"text/plain", b"not found: try /ready, /stats, /snapshot, /metrics\n"


_Event = h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> _Event:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.fail_after(READ_TIMEOUT_SECONDS):
            data = await stream.receive_some(16384)
        conn.receive_data(data)


async def _serve_connection(state: AdminState, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
    try:
        for _ in range(MAX_REQUESTS):
            event = await _next_event(conn, stream)
            if not isinstance(event, h11.Request):
                break
            while not isinstance(await _next_event(conn, stream), h11.EndOfMessage):
                pass  # the admin API takes no bodies
            status, ctype, body = await _route(state, event.method, event.target)
            headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
            data = conn.send(h11.Response(status_code=status, headers=headers)) or b""
            if event.method != b"HEAD":
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send_all(data)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                break
            conn.start_next_cycle()
    except (h11.RemoteProtocolError, trio.TooSlowError, trio.BrokenResourceError, OSError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve_admin(
    address: str,
    state: AdminState,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin endpoint on ``host:port`` until cancelled; ``started(port)``.

    Raises:
        OSError: the address cannot be bound (before ``started``).
    """
    host, _, port = address.rpartition(":")
    listeners = await trio.open_tcp_listeners(int(port), host=host)
    bound: int = listeners[0].socket.getsockname()[1]
    limit = trio.Semaphore(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limit.acquire_nowait()
        except trio.WouldBlock:  # at the limit: refuse rather than queue
            await trio.aclose_forcefully(stream)
            return
        try:
            await _serve_connection(state, stream)
        finally:
            limit.release()

    log.info("admin listening", address=f"{host}:{bound}")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(bound)

