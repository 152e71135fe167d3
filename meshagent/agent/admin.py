"""The agent's admin endpoint: a tiny HTTP/1.1 server (h11) on loopback or a unix socket.

    GET /ready      200 "ready" once the data path serves, 503 before
    GET /stats      connection counters per listener (JSON)
    GET /snapshot   the snapshot in force (JSON)
    GET /metrics    Prometheus text exposition

The address is ``host:port`` or ``unix:/absolute/path``. A unix socket is made mode
0660 (the service's group may use it: ``meshagent status``), a stale one left by a
crash is replaced, a live one (another agent answering) is an error, and the file is
removed on the way out. Every read has a deadline and each connection serves at most
``MAX_REQUESTS`` requests, so a stuck or greedy client costs one task for a bounded time.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import h11
import trio
from prometheus_client import CollectorRegistry

from meshagent.agent.metrics import exposition
from meshagent.agent.workers import Workers
from meshagent.config.agent import ADMIN_UNIX_PREFIX
from meshagent.dataplane.connection import ConnectionCounters, DataplaneContext, HttpStats
from meshagent.log import get_logger
from meshagent.snapshot import codec

log = get_logger("admin")

READ_TIMEOUT_SECONDS = 10.0
MAX_REQUESTS = 100
MAX_CONNECTIONS = 64
SOCKET_MODE = 0o660


class AdminState:
    """What the admin endpoint reports; filled in as the agent starts.

    With worker processes, the counters are the sum over the agent and its workers,
    asked for (``Workers.refresh``) before each /stats and /metrics answer."""

    def __init__(self, registry: CollectorRegistry, workers: Workers | None = None) -> None:
        self.registry = registry
        self.dataplane: DataplaneContext | None = None
        self.workers = workers

    async def refresh(self) -> None:
        if self.dataplane is not None:
            self.dataplane.sample_pools()
        if self.workers is not None:
            await self.workers.refresh(self.dataplane)

    def by_listener(self) -> dict[str, ConnectionCounters]:
        if self.workers is not None:
            return self.workers.by_listener
        return self.dataplane.by_listener if self.dataplane else {}

    def http(self) -> HttpStats | None:
        if self.workers is not None:
            return self.workers.http
        return self.dataplane.http if self.dataplane else None


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
        await state.refresh()
        body = await exposition(state.registry)
        return 200, b"text/plain; version=0.0.4; charset=utf-8", body
    if context is None:
        return 503, b"text/plain", b"starting\n"
    if path == b"/stats":
        await state.refresh()
        stats = {name: asdict(c) for name, c in sorted(state.by_listener().items())}
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
    """Serve the admin endpoint on ``host:port`` or ``unix:/path`` until cancelled;
    ``started(port)`` (0 for a unix socket).

    Raises:
        OSError: the address cannot be bound (before ``started``); EADDRINUSE for a
            unix socket another process answers on.
    """
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

    async with _open_admin_listeners(address) as (listeners, bound, shown):
        log.info("admin listening", address=shown)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started(bound)


@asynccontextmanager
async def _open_admin_listeners(
    address: str,
) -> AsyncIterator[tuple[list[trio.SocketListener], int, str]]:
    """(listeners, bound port or 0, the address to log); a unix socket file is removed
    when the block ends."""
    if not address.startswith(ADMIN_UNIX_PREFIX):
        host, _, port = address.rpartition(":")
        listeners = await trio.open_tcp_listeners(int(port), host=host)
        bound: int = listeners[0].socket.getsockname()[1]
        yield listeners, bound, f"{host}:{bound}"
        return
    path = Path(address.removeprefix(ADMIN_UNIX_PREFIX))
    await trio.to_thread.run_sync(_remove_stale_socket, path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        identity = os.stat(path)
        os.chmod(path, SOCKET_MODE)
        sock.listen(MAX_CONNECTIONS)
    except BaseException:
        sock.close()
        raise
    try:
        yield [trio.SocketListener(sock)], 0, address
    finally:
        sock.close()
        _unlink_if_ours(path, identity)


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file nobody answers on (left by a crash). Blocking.

    Raises:
        OSError: EADDRINUSE when a process answers on it; EEXIST when the path is
            not a socket (never removed: it is not ours).
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, "the path exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)
            return
    raise OSError(errno.EADDRINUSE, "another process answers on it (a running agent?)")


def _unlink_if_ours(path: Path, identity: os.stat_result) -> None:
    """Remove the socket file unless another process has replaced it since."""
    try:
        now = os.stat(path)
    except OSError:
        return
    if (now.st_dev, now.st_ino) == (identity.st_dev, identity.st_ino):
        path.unlink(missing_ok=True)
