"""serve_listener: bind one address and hand each accepted connection to a handler.

Like ``trio.serve_listeners``, handlers run in a ``handler_nursery`` that outlives the
listener, so cancelling a listener stops accepting without cutting in-flight connections.
Unlike it, a listener holds at most ``max_connections`` at once: at the limit it stops
accepting (new clients wait in the kernel's backlog) until a connection ends. With
``reclaim``, a new client waiting at the limit first makes the listener close one of
its connections that sit idle between requests (``Drain.reclaim``), or, when none is,
the first one to become idle while the client waits (``Drain.wanted``), so idle
keep-alive connections never lock out new ones.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from meshagent.dataplane.errors import BindError
from meshagent.dataplane.plainsocket import tune
from meshagent.log import get_logger

log = get_logger("listener")

# A handler takes over an accepted connection: a non-blocking socket (plainsocket.tune),
# which it closes.
Handler = Callable[[socket.socket], Awaitable[None]]


class Reclaim(Protocol):
    """How a listener at its limit makes room for a waiting client (``Drain``)."""

    def reclaim(self, listener: str) -> bool:
        """Close the listener's longest-idle connection; False when none is idle."""
        ...

    def wanted(self, listener: str) -> contextlib.AbstractContextManager[None]:
        """While inside, close the listener's next connection to become idle."""
        ...


# Errors accept() raises when the process or the system runs out of something; trio's
# serve_listeners sleeps and retries on the same set.
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_RESOURCE_BACKOFF_SECONDS = 0.1
_BACKLOG = 1024


async def open_listener(
    name: str, host: str, port: int, *, reuse_port: bool = False
) -> socket.socket:
    """Bind ``host:port`` (an IP address) and listen: a non-blocking socket, which
    ``serve_listener`` closes. Raises BindError with one line naming the listener and
    address. A cancel point.

    ``reuse_port``: set SO_REUSEPORT, so that the agent's worker processes each bind the
    same address and the kernel spreads new connections among them.
    """
    await trio.lowlevel.checkpoint()
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise BindError(f"{name}: cannot listen on {host}:{port}: not an IP address") from None
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # this address only, as trio's listeners
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(f"{name}: cannot listen on {host}:{port}: {_reason(exc)}") from None
    return sock


async def accept(listener: socket.socket) -> socket.socket:
    """The next connection waiting on ``listener``: non-blocking, ``tune``-d, owned by
    the caller. A cancel point (also when one was waiting already).

    Raises:
        OSError: accept(2) failed.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        try:
            conn, _ = listener.accept()
            break
        except BlockingIOError:
            waited = True
            await trio.lowlevel.wait_readable(listener)
    try:
        conn.setblocking(False)
        tune(conn)
    except BaseException:
        conn.close()
        raise
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return conn


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


async def serve_listener(
    name: str,
    listener: socket.socket,
    handler: Handler,
    handler_nursery: trio.Nursery,
    *,
    max_connections: int,
    reclaim: Reclaim | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever (until cancelled); a cancel point. Closes the listener on exit.

    ``reclaim``: asked at the limit once a client waits to close an idle connection
    (whose handler ends soon and frees a place), or, when none is idle, the next one
    to become idle before a place frees."""
    limit = trio.Semaphore(max_connections)
    warned = False

    async def run(conn: socket.socket) -> None:
        try:
            await handler(conn)
        finally:
            conn.close()  # a no-op once the handler's stream closed or took it over
            limit.release()

    try:
        task_status.started()
        while True:
            reclaimed = False
            wanted: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
            if limit.value == 0 and reclaim is not None:
                await trio.lowlevel.wait_readable(listener)  # a client waits
                reclaimed = limit.value == 0 and reclaim.reclaim(name)
                if reclaimed:
                    log.debug("closed an idle connection for a new one", listener=name)
                else:  # none idle now: the first to become idle before a place frees
                    wanted = reclaim.wanted(name)
            if limit.value == 0 and not reclaimed and not warned:
                log.warning("connection limit reached", listener=name, limit=max_connections)
                warned = True
            with wanted:
                await limit.acquire()
            warned = warned and limit.value == 0
            try:
                conn = await accept(listener)
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
            handler_nursery.start_soon(run, conn)
    finally:
        trio.lowlevel.notify_closing(listener)  # trio forgets the descriptor first
        listener.close()
