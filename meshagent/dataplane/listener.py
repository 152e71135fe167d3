"""serve_listener: bind one address and hand each accepted connection to a handler.

Like ``trio.serve_listeners``, handlers run in a ``handler_nursery`` that outlives the
listener, so cancelling a listener stops accepting without cutting in-flight connections.
Unlike it, a listener holds at most ``max_connections`` at once: at the limit it stops
accepting (new clients wait in the kernel's backlog) until a connection ends.
"""

from __future__ import annotations

import errno
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


async def open_listener(name: str, host: str, port: int) -> trio.SocketListener:
    """Bind ``host:port``. Raises BindError with one line naming the listener and address."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise BindError(f"{name}: cannot listen on {host}:{port}: {reason}") from None
    if len(listeners) != 1:  # host is an IP address, so exactly one
        for extra in listeners:
            await extra.aclose()
        raise BindError(f"{name}: {host} resolved to {len(listeners)} addresses; use one IP")
    return listeners[0]


async def serve_listener(
    name: str,
    listener: trio.SocketListener,
    handler: Handler,
    handler_nursery: trio.Nursery,
    *,
    max_connections: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept forever (until cancelled); a cancel point. Closes the listener on exit."""
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
            if limit.value == 0 and not warned:
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
