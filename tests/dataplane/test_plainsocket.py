"""``plainsocket.PlainSocketStream`` on real loopback TCP: trio's own conformance checks
for a two-way stream, half-close as ``trio.SocketStream`` does it, and closing without
telling trio when no task waits (one failing ``epoll_ctl`` less per connection)."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from meshagent.dataplane.plainsocket import PlainSocketStream, tune


def _connected() -> tuple[socket.socket, socket.socket]:
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.socket()
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    finally:
        listener.close()
    for sock in (client, server):
        sock.setblocking(False)
        tune(sock)
    return client, server


async def stream_pair() -> tuple[PlainSocketStream, PlainSocketStream]:
    client, server = _connected()
    return PlainSocketStream(client), PlainSocketStream(server)


async def clogged_pair() -> tuple[PlainSocketStream, PlainSocketStream]:
    """Both ways full: a send waits until the other end reads."""
    a, b = await stream_pair()
    for writer, reader in ((a, b), (b, a)):
        writer._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        reader._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        while True:
            try:
                writer._sock.send(b"x" * 65536)
            except BlockingIOError:
                break
    return a, b


async def test_trio_two_way_stream_conformance() -> None:
    await trio.testing.check_two_way_stream(stream_pair, clogged_pair)


async def test_half_close_as_trio_socket_streams_do() -> None:
    a, b = await stream_pair()
    async with a, b:
        await a.send_all(b"x")
        await a.send_eof()
        assert await b.receive_some(10) == b"x"
        assert await b.receive_some(10) == b""
        with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
            await a.send_all(b"y")
        with pytest.raises(trio.ClosedResourceError):
            await a.send_all(b"")
        await a.send_eof()  # again: nothing
        await b.send_all(b"back")  # the other way goes on
        assert await a.receive_some(10) == b"back"
    with pytest.raises(trio.ClosedResourceError):
        await a.send_eof()


async def test_close_at_once_is_idempotent() -> None:
    # aclose is close and a checkpoint: the conformance test covers waking a waiter.
    a, b = await stream_pair()
    async with b:
        a.close()  # a plain call, not a checkpoint
        assert a.fileno() == -1
        a.close()
        await a.aclose()  # still idempotent
        assert await b.receive_some(10) == b""


async def test_closing_tells_trio_only_when_a_task_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    told: list[int] = []
    notify = trio.lowlevel.notify_closing

    def recording(fd: socket.socket) -> None:
        told.append(fd.fileno())
        notify(fd)

    monkeypatch.setattr(trio.lowlevel, "notify_closing", recording)
    a, b = await stream_pair()
    async with a, b:
        await b.send_all(b"1")
        assert await a.receive_some(10) == b"1"  # no wait: trio never saw a
    assert told == []

    a, b = await stream_pair()
    waited_on = a.fileno()
    async with b:

        async def receive_then_close() -> None:
            assert await a.receive_some(10) == b"2"  # waits, then trio is done with it
            await a.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_then_close)
            await trio.testing.wait_all_tasks_blocked()
            await b.send_all(b"2")
    assert told == []

    # The descriptor number comes back for a new connection: trio waits on it anew.
    c, d = await stream_pair()
    assert c.fileno() == waited_on  # the lowest free numbers, as POSIX gives them
    async with c, d, trio.open_nursery() as nursery:
        nursery.start_soon(d.send_all, b"3")
        with trio.fail_after(5):
            assert await c.receive_some(10) == b"3"

    a, b = await stream_pair()
    async with b:
        fd = a.fileno()

        async def receive_closed() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await a.receive_some(10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_closed)
            await trio.testing.wait_all_tasks_blocked()
            await a.aclose()  # wakes the receiver
    assert told == [fd]
