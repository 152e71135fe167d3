"""SslSocketStream on real loopback sockets with real mTLS: the pitfalls of driving a
non-blocking ssl.SSLSocket from trio (buffered plaintext, want-read/want-write, partial
writes, EOF without close_notify, tickets, cancellation, two tasks, fd ownership)."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import pytest
import trio

from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.pool import is_stale
from meshagent.dataplane.sslsocket import SslSocketStream, close_now
from meshagent.dataplane.tls import client_context
from tests.support.net import take_socket
from tests.support.pki import make_ca
from tests.support.tls import Contexts, tcp_pair, tls_pair


async def _receive_exactly(stream: SslSocketStream, size: int, chunk: int = 65536) -> bytes:
    parts = []
    got = 0
    while got < size:
        data = await stream.receive_some(min(chunk, size - got))
        assert data, f"EOF after {got} of {size} bytes"
        parts.append(data)
        got += len(data)
    return b"".join(parts)


async def test_bulk_both_ways_at_once_from_two_tasks_per_side(contexts: Contexts) -> None:
    # Each side sends 8 MiB while it receives 8 MiB: one task sends, another receives
    # (as splice's pumps do); socket buffers fill, so sends wait and resume part way.
    size = 8 << 20
    payload_a = os.urandom(size)
    payload_b = os.urandom(size)
    got: dict[str, bytes] = {}
    async with tls_pair(contexts) as (server, client):

        async def send(stream: SslSocketStream, data: bytes) -> None:
            for i in range(0, len(data), 65540):  # an odd size, like DATA frames
                await stream.send_all(data[i : i + 65540])

        async def receive(stream: SslSocketStream, name: str) -> None:
            got[name] = await _receive_exactly(stream, size)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, server, payload_a)
                nursery.start_soon(send, client, payload_b)
                nursery.start_soon(receive, client, "a")
                nursery.start_soon(receive, server, "b")
    assert got["a"] == payload_a
    assert got["b"] == payload_b


async def test_plaintext_buffered_in_openssl_is_read_without_waiting(contexts: Contexts) -> None:
    # One 16 KiB record, read 10 bytes at a time: after the first read the socket is
    # empty and the rest sits in OpenSSL (pending()); waiting for readability would hang.
    async with tls_pair(contexts) as (server, client):
        record = os.urandom(16384)
        await server.send_all(record)
        with trio.fail_after(2):
            first = await client.receive_some(10)
            assert client.ssl_object.pending() > 0
            assert client.is_readable()
            rest = await _receive_exactly(client, len(record) - len(first), chunk=10)
        assert first + rest == record
        assert not client.ssl_object.pending()


async def test_a_bulk_receive_reads_several_records_at_once(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (server, client):
        await server.send_all(os.urandom(64 * 1024))
        await trio.sleep(0.05)  # every record on the client's socket
        with trio.fail_after(2):
            data = await client.receive_some(64 * 1024)
        assert len(data) > 16384


async def test_close_notify_is_a_clean_end_of_stream(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (server, client):
        await server.send_all(b"last words")
        await server.aclose()
        with trio.fail_after(2):
            assert await client.receive_some(100) == b"last words"
            assert await client.receive_some(100) == b""
            assert await client.receive_some(100) == b""


async def test_forceful_close_still_sends_close_notify_when_the_socket_takes_it(
    contexts: Contexts,
) -> None:
    async with tls_pair(contexts) as (server, client):
        await trio.aclose_forcefully(server)
        with trio.fail_after(2):
            assert await client.receive_some(100) == b""


async def test_close_at_once_sends_close_notify_too(contexts: Contexts) -> None:
    # close() shares aclose's last step (waking a blocked task: tested below).
    async with tls_pair(contexts) as (server, client):
        fd = server.fileno()
        server.close()  # a plain call: what aclose_forcefully does, without a checkpoint
        with pytest.raises(OSError):
            os.fstat(fd)
        server.close()  # idempotent
        with trio.fail_after(2):
            assert await client.receive_some(100) == b""


async def test_close_now_closes_any_stream_forcefully(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (server, client):
        await close_now(server)
        assert server.fileno() == -1
        with trio.fail_after(2):
            assert await client.receive_some(100) == b""
    memory, peer = trio.testing.memory_stream_pair()  # not the agent's own: trio's path
    await close_now(memory)
    with pytest.raises(trio.ClosedResourceError):
        await memory.send_all(b"x")
    await peer.aclose()


async def test_eof_without_close_notify_breaks_the_stream(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (server, client):
        server.ssl_object.close()  # the TCP connection ends, no close_notify
        with trio.fail_after(2), pytest.raises(trio.BrokenResourceError, match="close_notify"):
            await client.receive_some(100)


async def test_tls13_tickets_resume_the_session_with_both_identities(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (server, client):
        assert client.ssl_object.version() == "TLSv1.3"
        await server.send_all(b"hi")  # the tickets went out before it
        assert await client.receive_some(10) == b"hi"
        session = client.session
        assert session is not None and session.has_ticket
        assert not client.session_reused
    async with tls_pair(contexts, session=session) as (server, client):
        assert client.session_reused and server.session_reused
        # A resumed session skips the certificates on the wire, not their identities.
        assert client.getpeercert() == server_cert_of(contexts)
        server_view = server.getpeercert()
        assert server_view is not None and "web" in str(server_view["subjectAltName"])
        await client.send_all(b"ping")
        assert await server.receive_some(10) == b"ping"


def server_cert_of(contexts: Contexts) -> object:
    return ssl._ssl._test_decode_cert(  # type: ignore[attr-defined]
        str(contexts.ca.directory / "orders.pem")
    )


async def test_tls12_works_too(contexts: Contexts) -> None:
    client = client_context(contexts.ca.issue("web"))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with tls_pair(contexts, client=client) as (server, tls):
        assert tls.ssl_object.version() == "TLSv1.2"
        await tls.send_all(b"x" * 100_000)
        assert await _receive_exactly(server, 100_000) == b"x" * 100_000


async def test_a_cancelled_send_part_way_breaks_the_stream(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (_server, client):
        with trio.move_on_after(0.2) as scope:
            await client.send_all(os.urandom(16 << 20))  # the server never reads
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"more")
        await client.aclose()  # no close_notify after a broken write; closes all the same
        assert client.fileno() == -1


async def test_a_cancelled_receive_does_not_break_the_stream(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (server, client):
        with trio.move_on_after(0.05):
            await client.receive_some(100)
        await server.send_all(b"later")
        with trio.fail_after(2):
            assert await client.receive_some(100) == b"later"


async def test_two_senders_or_two_receivers_are_refused(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (server, client), trio.open_nursery() as nursery:
        nursery.start_soon(client.receive_some, 10)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await client.receive_some(10)
        await server.send_all(b"x")


async def test_a_want_of_the_other_direction_waits_behind_the_task_waiting_for_it(
    contexts: Contexts,
) -> None:
    # A receive that needs the socket writable (a TLS 1.3 key update) while the sending
    # task waits for that: trio allows one waiter per direction, so it must park.
    async with tls_pair(contexts) as (server, client):
        done: list[str] = []

        async def fill() -> None:
            await client.send_all(os.urandom(16 << 20))
            done.append("send")

        async def also_wait() -> None:
            await client._wait_writable()  # the mechanism under test
            done.append("wait")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fill)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(also_wait)
                await trio.testing.wait_all_tasks_blocked()
                assert done == []
                await _receive_exactly(server, 16 << 20)
        assert sorted(done) == ["send", "wait"]


async def test_closing_wakes_a_task_blocked_in_receive(contexts: Contexts) -> None:
    async with tls_pair(contexts) as (_server, client):

        async def receive() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some(10)

        with trio.fail_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receive)
                await trio.testing.wait_all_tasks_blocked()
                await client.aclose()


async def test_the_descriptor_moves_to_the_tls_stream_and_closes_once(contexts: Contexts) -> None:
    server_tcp, client_tcp = await tcp_pair()
    fd = client_tcp.socket.fileno()
    tls = SslSocketStream.wrap(take_socket(client_tcp), contexts.client, server_side=False)
    assert client_tcp.socket.fileno() == -1
    assert tls.fileno() == fd
    await client_tcp.aclose()  # owns nothing any more
    os.fstat(fd)  # still open: the TLS stream's
    await tls.aclose()
    with pytest.raises(OSError):
        os.fstat(fd)
    await tls.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await tls.receive_some(1)
    await server_tcp.aclose()


async def test_a_failed_handshake_is_a_broken_resource(contexts: Contexts, tmp_path: Path) -> None:
    stranger = make_ca(tmp_path / "other", "shop")
    client = client_context(stranger.issue("web"))
    server_tcp, client_tcp = await tcp_pair()
    server = SslSocketStream.wrap(take_socket(server_tcp), contexts.server, server_side=True)
    tls = SslSocketStream.wrap(take_socket(client_tcp), client, server_side=False)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def client_side() -> None:
                with pytest.raises(trio.BrokenResourceError):
                    await tls.do_handshake()

            nursery.start_soon(client_side)
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.do_handshake()
    assert isinstance(info.value.__cause__, ssl.SSLError)
    await server.aclose()
    await tls.aclose()


async def test_plaintext_into_a_tls_server_fails_the_handshake(contexts: Contexts) -> None:
    server_tcp, client_tcp = await tcp_pair()
    server = SslSocketStream.wrap(take_socket(server_tcp), contexts.server, server_side=True)
    await client_tcp.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
        await server.do_handshake()
    await server.aclose()
    await client_tcp.aclose()


async def test_a_pooled_connection_with_a_descriptor_past_1024_is_checked_not_thrown_away(
    contexts: Contexts,
) -> None:
    # select() refuses descriptors from 1024 on; a busy agent has them, and its pool
    # took every idle connection for stale.
    import resource

    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= 1100:
        pytest.skip("RLIMIT_NOFILE too low for a descriptor past 1024")
    server_tcp, client_tcp = await tcp_pair()
    high = os.dup2(client_tcp.socket.fileno(), 1100)
    client_tcp.socket.close()
    stream = PlainSocketStream(socket.socket(fileno=high))
    assert not is_stale(stream)
    await server_tcp.send_all(b"stray")
    await trio.sleep(0.05)
    assert is_stale(stream)
    await stream.aclose()
    await server_tcp.aclose()
