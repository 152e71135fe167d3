"""open_tcp: the data path's TCP connect (plainsocket.py), on loopback."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from meshagent.dataplane.plainsocket import PlainSocketStream, open_tcp
from tests.support.net import free_port


async def _listener(host: str) -> trio.SocketListener:
    return (await trio.open_tcp_listeners(0, host=host))[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_connects_to_an_address_or_a_name(host: str) -> None:
    listener = await _listener("127.0.0.1")
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(5):
            sock = await open_tcp(host, port)
            async with PlainSocketStream(sock) as stream, await listener.accept() as server:
                await stream.send_all(b"ping")
                assert await server.receive_some(10) == b"ping"
                assert not sock.getblocking()
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                lowat = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
                assert lowat == 16 * 1024  # as a trio.SocketStream's


async def test_a_loopback_connect_done_within_connect_skips_trios_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # connect(2) completes the loopback handshake before it returns (EINPROGRESS all
    # the same): a poll sees it, with no registration in trio's epoll set.
    async def no_wait(sock: socket.socket) -> None:
        raise AssertionError("open_tcp waited in trio for a connect that was done")

    listener = await _listener("127.0.0.1")
    async with listener:
        monkeypatch.setattr(trio.lowlevel, "wait_writable", no_wait)
        for _ in range(20):
            with await open_tcp("127.0.0.1", listener.socket.getsockname()[1]):
                pass
        monkeypatch.undo()
        for _ in range(20):
            (await listener.accept()).socket.close()


async def test_ipv6_literal() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        listener = await _listener("::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    async with listener:
        with await open_tcp("::1", listener.socket.getsockname()[1]) as sock:
            assert sock.family == socket.AF_INET6


async def test_a_refused_connect_says_so_and_leaves_no_descriptor() -> None:
    port = free_port("127.0.0.1")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as caught:
        await open_tcp("127.0.0.1", port)
    assert caught.value.errno == errno.ECONNREFUSED
    assert caught.value.strerror == "Connection refused"
    assert len(os.listdir("/proc/self/fd")) == before


async def test_a_cancelled_connect_leaves_no_descriptor() -> None:
    """A listener that never accepts, its backlog full: the next connect waits."""
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        held: list[socket.socket] = []
        try:
            for _ in range(8):  # the first few fill the queue
                before = len(os.listdir("/proc/self/fd"))
                with trio.move_on_after(0.3) as scope:
                    held.append(await open_tcp("127.0.0.1", port))
                if scope.cancelled_caught:
                    break
            assert scope.cancelled_caught, "every connect was taken: the backlog never filled"
            assert len(os.listdir("/proc/self/fd")) == before
        finally:
            for sock in held:
                sock.close()
