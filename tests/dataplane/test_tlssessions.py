"""TLS session helpers (dataplane/tlssessions.py and the tls_* functions of _pump.c):
resumption through them, on real loopback TLS, and their fallbacks."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Iterator

import pytest
import trio

from meshagent.dataplane import nativepump, tlssessions
from meshagent.dataplane.tls import client_context, server_context, ticket_keys
from tests.support.tls import Contexts, tls_pair

pytestmark = pytest.mark.skipif(
    nativepump.native_problem() is not None, reason=f"no C helpers: {nativepump.native_problem()}"
)


@pytest.fixture(autouse=True)
def fresh_helpers() -> Iterator[None]:
    """Each test decides anew whether the helpers work (some turn them off)."""
    tlssessions._native = None
    yield
    tlssessions._native = None


async def _session_of(contexts: Contexts, *, abort: bool = False) -> ssl.SSLSession:
    """A client session with a ticket, from a full handshake, kept as an agent keeps it;
    ``abort``: then the client resets the connection, so the server's end breaks and
    closes without close_notify."""
    async with tls_pair(contexts) as (server, client):
        await server.send_all(b"hi")  # the ticket went out before it
        assert await client.receive_some(10) == b"hi"
        session = client.session
        assert session is not None and session.has_ticket
        tlssessions.own(session)  # at once, as TlsContexts.keep_session does
        if abort:
            linger = struct.pack("ii", 1, 0)  # close sends RST
            client.ssl_object.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            client.ssl_object.close()
            with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
                await server.receive_some(10)
            await server.aclose()
    return session


def test_server_contexts_keep_their_sessions_in_memory(contexts: Contexts) -> None:
    assert contexts.server.options & ssl.OP_NO_TICKET
    assert not contexts.client.options & ssl.OP_NO_TICKET


async def test_a_kept_session_resumes_many_times_even_after_abortive_closes(
    contexts: Contexts,
) -> None:
    session = await _session_of(contexts)
    for abort in (True, False, True, True):
        async with tls_pair(contexts, session=session) as (server, client):
            assert client.session_reused and server.session_reused
            # The identities a resumed session carries are still there.
            view = server.getpeercert()
            assert view is not None and "web" in str(view["subjectAltName"])
            await client.send_all(b"ping")
            assert await server.receive_some(10) == b"ping"
            if abort:  # both ends go without close_notify: the session must survive
                server.ssl_object.close()
                with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
                    await client.receive_some(10)


async def test_the_session_of_an_aborted_connection_still_resumes(contexts: Contexts) -> None:
    session = await _session_of(contexts, abort=True)
    async with tls_pair(contexts, session=session) as (server, client):
        assert client.session_reused and server.session_reused


async def test_without_keep_on_close_an_abortive_close_costs_the_session(
    contexts: Contexts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What keep_on_close is for: OpenSSL drops a stateful session from the cache when
    the connection that made it is freed without a shutdown."""
    monkeypatch.setattr(tlssessions, "keep_on_close", lambda sock: None)
    session = await _session_of(contexts, abort=True)
    async with tls_pair(contexts, session=session) as (server, client):
        assert not server.session_reused and not client.session_reused


async def test_a_session_from_a_restarted_server_is_refused_not_an_error(
    contexts: Contexts,
) -> None:
    session = await _session_of(contexts)
    contexts.server = server_context(contexts.ca.issue("orders"))  # a new cache
    async with tls_pair(contexts, session=session) as (server, client):
        assert not client.session_reused and not server.session_reused
        await server.send_all(b"hi")
        assert await client.receive_some(10) == b"hi"
        fresh = client.session
    assert fresh is not None and fresh.has_ticket  # to be kept in place of the old one
    tlssessions.own(fresh)
    async with tls_pair(contexts, session=fresh) as (server, client):
        assert client.session_reused and server.session_reused


async def test_a_session_of_another_context_is_refused(contexts: Contexts) -> None:
    session = await _session_of(contexts)
    other = client_context(contexts.ca.issue("web"))
    a, b = socket.socketpair()
    with (
        b,
        other.wrap_socket(a, do_handshake_on_connect=False) as sock,
        pytest.raises(ValueError, match="another SSLContext"),
    ):
        tlssessions.resume(sock, session)


async def test_a_session_is_given_before_the_handshake_only(contexts: Contexts) -> None:
    session = await _session_of(contexts)
    async with tls_pair(contexts) as (_server, client):
        with pytest.raises(ValueError, match="handshake has started"):
            tlssessions.resume(client.ssl_object, session)


async def test_layout_checks_refuse_what_does_not_match(contexts: Contexts) -> None:
    pump = nativepump._pump  # type: ignore[attr-defined]
    session = await _session_of(contexts)
    ctx = contexts.server
    with pytest.raises(RuntimeError, match="unknown _ssl layout"):
        pump.tls_server_cache(ctx, ctx.options ^ ssl.OP_NO_COMPRESSION, 16)
    with pytest.raises(TypeError, match="SSLContext"):
        pump.tls_server_cache(object(), 0, 16)
    with pytest.raises(ValueError, match="at least one"):
        pump.tls_server_cache(ctx, ctx.options, 0)
    with pytest.raises(RuntimeError, match="unknown _ssl layout"):
        pump.tls_own_session(session, b"\0" * len(session.id))
    with pytest.raises(TypeError, match="SSLSession"):
        pump.tls_own_session(object(), b"")
    async with tls_pair(contexts) as (_server, client):
        sslobj = client.ssl_object._sslobj  # type: ignore[attr-defined]
        with pytest.raises(RuntimeError, match="does not match its socket"):
            pump.tls_keep_on_close(sslobj, client.fileno() + 1000)
        with pytest.raises(TypeError, match="_SSLSocket"):
            pump.tls_keep_on_close(object(), 0)


async def test_turned_off_the_ssl_module_does_it_all(
    contexts: Contexts, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(nativepump.ENV_SWITCH, "0")
    tlssessions._native = None
    contexts.server = server_context(contexts.ca.issue("orders"))
    contexts.client = client_context(contexts.ca.issue("web"))
    assert not contexts.server.options & ssl.OP_NO_TICKET  # stateless tickets
    session = await _session_of(contexts)
    for _ in range(2):
        async with tls_pair(contexts, session=session) as (server, client):
            assert client.session_reused and server.session_reused


async def test_a_failed_layout_check_falls_back_for_good(
    contexts: Contexts, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await _session_of(contexts)

    class Broken:
        def __getattr__(self, name: str) -> object:
            def fail(*args: object) -> None:
                raise RuntimeError("the TLS object does not match (unknown _ssl layout)")

            return fail

    monkeypatch.setattr(nativepump, "_pump", Broken())
    monkeypatch.setattr(nativepump, "native_problem", lambda: None)
    server = server_context(contexts.ca.issue("orders"))
    assert not server.options & ssl.OP_NO_TICKET
    assert tlssessions._native is False
    # The ssl module's own path still resumes (with the old, stateless server).
    async with tls_pair(contexts, session=session) as (srv, client):
        assert client.session_reused and srv.session_reused


async def test_shared_ticket_keys_resume_in_another_process(contexts: Contexts) -> None:
    """Two server contexts with one secret stand for two worker processes."""
    files = contexts.ca.issue("orders")
    secret = b"s" * 32
    contexts.server = server_context(files, ticket_secret=secret)
    assert not contexts.server.options & ssl.OP_NO_TICKET  # stateless tickets
    session = await _session_of(contexts)
    contexts.server = server_context(files, ticket_secret=secret)  # "the other worker"
    async with tls_pair(contexts, session=session) as (server, client):
        assert client.session_reused and server.session_reused
    contexts.server = server_context(files, ticket_secret=b"t" * 32)  # another agent
    async with tls_pair(contexts, session=session) as (server, client):
        assert not client.session_reused and not server.session_reused


def test_ticket_keys_change_with_the_certificates(contexts: Contexts) -> None:
    files = contexts.ca.issue("orders")
    keys = ticket_keys(b"s" * 32, files)
    assert len(keys) == 80
    assert ticket_keys(b"s" * 32, files) == keys
    assert ticket_keys(b"t" * 32, files) != keys
    assert ticket_keys(b"s" * 32, contexts.ca.issue("orders")) != keys  # renewed


def test_ticket_keys_are_80_bytes(contexts: Contexts) -> None:
    pump = nativepump._pump  # type: ignore[attr-defined]
    ctx = contexts.server
    with pytest.raises(ValueError, match="80 bytes"):
        pump.tls_ticket_keys(ctx, ctx.options, b"x" * 48)
    with pytest.raises(RuntimeError, match="unknown _ssl layout"):
        pump.tls_ticket_keys(ctx, ctx.options ^ ssl.OP_NO_COMPRESSION, b"x" * 80)
