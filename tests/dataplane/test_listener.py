"""open_listener and accept (dataplane/listener.py), on loopback."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from meshagent.dataplane.errors import BindError
from meshagent.dataplane.listener import accept, open_listener


async def test_an_accepted_connection_is_a_tuned_non_blocking_socket() -> None:
    listener = await open_listener("inbound:test", "127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()[:2], timeout=5) as client:
        with trio.fail_after(5):
            conn = await accept(listener)
        with conn:
            assert not conn.getblocking()
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == 16 * 1024
            assert conn.getpeername() == client.getsockname()
            client.sendall(b"ping")
            await trio.lowlevel.wait_readable(conn)
            assert conn.recv(10) == b"ping"


async def test_accept_waits_for_a_client_and_is_cancellable() -> None:
    listener = await open_listener("inbound:test", "127.0.0.1", 0)
    with listener:
        with trio.move_on_after(0.2) as waiting:
            await accept(listener)
        assert waiting.cancelled_caught
        async with trio.open_nursery() as nursery:
            got: list[socket.socket] = []

            async def take() -> None:
                got.append(await accept(listener))

            nursery.start_soon(take)
            await trio.testing.wait_all_tasks_blocked()  # accept waits: no client yet
            with socket.create_connection(listener.getsockname()[:2], timeout=5):
                with trio.fail_after(5):
                    while not got:
                        await trio.sleep(0.01)
        got[0].close()


async def test_a_name_is_refused_in_one_line() -> None:
    with pytest.raises(BindError) as caught:
        await open_listener("inbound:orders:15443", "localhost", 15443)
    assert str(caught.value) == (
        "inbound:orders:15443: cannot listen on localhost:15443: not an IP address"
    )


async def test_a_taken_port_says_so_and_reuse_port_shares_it() -> None:
    first = await open_listener("inbound:a", "127.0.0.1", 0, reuse_port=True)
    with first:
        port = first.getsockname()[1]
        with pytest.raises(BindError) as caught:
            await open_listener("inbound:b", "127.0.0.1", port)
        assert str(caught.value) == (
            f"inbound:b: cannot listen on 127.0.0.1:{port}: address already in use"
        )
        with await open_listener("inbound:c", "127.0.0.1", port, reuse_port=True) as second:
            assert second.getsockname()[1] == port


async def test_an_ipv6_listener_takes_that_address_only() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        listener = await open_listener("inbound:v6", "::1", 0)
    except BindError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        assert listener.family == socket.AF_INET6
        assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
