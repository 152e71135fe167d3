"""Loopback helpers: free ports, echo apps, bounded polling."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio

from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.demo.ports import free_port

__all__ = [
    "free_port", "full_backlog", "plain_stream", "read_head", "round_trip", "serve_app",
    "serve_echo", "take_socket", "wait_until",
]


def take_socket(stream: trio.SocketStream) -> socket.socket:
    """The connection of a test's ``trio.SocketStream`` as the non-blocking socket the
    data path takes (the descriptor moves: the stream owns none afterwards)."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(False)
    return sock


def plain_stream(stream: trio.SocketStream) -> PlainSocketStream:
    """The connection of ``stream`` as a ``PlainSocketStream`` (see ``take_socket``)."""
    return PlainSocketStream(take_socket(stream))


async def serve_app(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    host: str = "127.0.0.1",
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``handler`` on a free port of ``host`` until cancelled; started with the port."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    port: int = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(port)


async def serve_echo(
    host: str, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An app that echoes bytes and half-closes when the client does."""

    async def echo(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                await stream.send_eof()
        except trio.BrokenResourceError:
            pass

    await serve_app(echo, host, task_status=task_status)


@asynccontextmanager
async def full_backlog(host: str = "127.0.0.1") -> AsyncIterator[int]:
    """The port of a listener that never accepts, its backlog full: the kernel drops
    the SYNs of the next connects, which wait until their own timeout."""
    with socket.socket() as listener:
        listener.bind((host, 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        held: list[trio.SocketStream] = []
        try:
            for _ in range(16):  # the first one or two fill the queue
                with trio.move_on_after(0.3) as scope:
                    held.append(await trio.open_tcp_stream(host, port))
                if scope.cancelled_caught:
                    break
            else:
                raise AssertionError("every connect was taken: the backlog never filled")
            yield port
        finally:
            for stream in held:
                await stream.aclose()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until true; fail the test after ``timeout`` seconds."""
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)


async def read_head(
    stream: trio.abc.ReceiveStream, buffered: bytes = b"", chunk: int = 4096
) -> tuple[bytes, bytes] | None:
    """What a test app reads of an HTTP message: from ``buffered`` on, until a head is
    whole, (the head with its blank line, the bytes after it); None when the stream
    ended first."""
    while b"\r\n\r\n" not in buffered:
        data = await stream.receive_some(chunk)
        if not data:
            return None
        buffered += data
    end = buffered.index(b"\r\n\r\n") + 4
    return buffered[:end], buffered[end:]


async def round_trip(host: str, port: int, payload: bytes, *, timeout: float = 10) -> bytes:
    """Send ``payload``, half-close, read until the other side closes.

    Reads while it sends, as a real client does: a client that sends a large payload
    before it reads anything deadlocks against any echo path once the payload is larger
    than the buffers on the way (the kernel's autotuned socket buffers decide when)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            chunks = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await stream.receive_some(65536):
                    chunks.append(data)
            return b"".join(chunks)
