"""serve_listener: bind one address and hand each accepted connection to a handler.

Like ``trio.serve_listeners``, handlers run in a ``handler_nursery`` that outlives the
listener, so cancelling a listener stops accepting without cutting in-flight connections.
Unlike it, a listener holds at most ``max_connections`` at once: at the limit it stops
accepting (new clients wait in the kernel's backlog) until a connection ends. With
``reclaim``, a new client waiting at the limit first makes the listener close one of
its connections that sit idle between requests (``Drain.reclaim``), so idle keep-alive
connections never lock out new ones.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable

import trio

from meshagent.dataplane.errors import BindError
from meshagent.log import get_logger

log = get_logger("listener")

Handler = Callable[[trio.SocketStream], Awaitable[None]]

# Errors accept() raises when the process or the system runs out of something; trio's
# serve_listeners sleeps and retries on the same set.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_RESOURCE_BACKOFF_SECONDS = 0.1
_BACKLOG = 1024


async def open_listener(
    name: str, host: str, port: int, *, reuse_port: bool = False
) -> trio.SocketListener:
    """Bind ``host:port``. Raises BindError with one line naming the listener and address.

    ``reuse_port``: set SO_REUSEPORT, so that the agent's worker processes each bind the
    same address and the kernel spreads new connections among them.
    """
    if reuse_port:
        return await _open_reuse_port_listener(name, host, port)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=_BACKLOG)
    except OSError as exc:
        raise BindError(f"{name}: cannot listen on {host}:{port}: {_reason(exc)}") from None
    if len(listeners) != 1:  # host is an IP address, so exactly one
        for extra in listeners:
            await extra.aclose()
        raise BindError(f"{name}: {host} resolved to {len(listeners)} addresses; use one IP")
    return listeners[0]


async def _open_reuse_port_listener(name: str, host: str, port: int) -> trio.SocketListener:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(f"{name}: cannot listen on {host}:{port}: {_reason(exc)}") from None
    return trio.SocketListener(sock)


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


async def serve_listener(
    name: str,
    listener: trio.SocketListener,
    handler: Handler,
    handler_nursery: trio.Nursery,
    *,
    max_connections: int,
    reclaim: Callable[[], bool] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever (until cancelled); a cancel point. Closes the listener on exit.

    ``reclaim``: called at the limit once a client waits; True when it closed an idle
    connection (whose handler ends soon and frees a place)."""
    limit = trio.Semaphore(max_connections)
    warned = False

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        finally:
            limit.release()

    async with listener:
        task_status.started()
        while True:
            reclaimed = False
            if limit.value == 0 and reclaim is not None:
                await trio.lowlevel.wait_readable(listener.socket)  # a client waits
                reclaimed = limit.value == 0 and reclaim()
                if reclaimed:
                    log.debug("closed an idle connection for a new one", listener=name)
            if limit.value == 0 and not reclaimed and not warned:
                log.warning("connection limit reached", listener=name, limit=max_connections)
                warned = True
            await limit.acquire()
            warned = warned and limit.value == 0
            try:
                stream = await listener.accept()
            except OSError as exc:
                limit.release()
                if exc.errno in _RESOURCE_ERRNOS:
                    log.error("accept failed", listener=name, error=exc.strerror)
                    await trio.sleep(_RESOURCE_BACKOFF_SECONDS)
                    continue
                raise
            except BaseException:
                limit.release()
                raise
            handler_nursery.start_soon(run, stream)
