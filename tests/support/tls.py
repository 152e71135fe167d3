"""Loopback TLS helpers: a mesh CA's server and client contexts, a connected TCP pair,
and a handshaken TLS pair over one."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from meshagent.dataplane.sslsocket import SslSocketStream
from meshagent.dataplane.tls import client_context, server_context
from tests.support.net import take_socket
from tests.support.pki import MeshCa, make_ca


@dataclass
class Contexts:
    """An ``orders`` server and a ``web`` client of one mesh CA (``shop``)."""

    ca: MeshCa
    server: ssl.SSLContext
    client: ssl.SSLContext


def make_contexts(directory: Path) -> Contexts:
    ca = make_ca(directory / "ca", "shop")
    return Contexts(ca, server_context(ca.issue("orders")), client_context(ca.issue("web")))


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """(server, client): the two ends of one loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        client = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
        server = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    return server, client


@asynccontextmanager
async def tls_pair(
    contexts: Contexts,
    *,
    client: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
    on_session: Callable[[ssl.SSLSession], None] | None = None,
) -> AsyncIterator[tuple[SslSocketStream, SslSocketStream]]:
    """(server, client), handshaken; both closed at the end."""
    server_tcp, client_tcp = await tcp_pair()
    server = SslSocketStream.wrap(take_socket(server_tcp), contexts.server, server_side=True)
    tls = SslSocketStream.wrap(
        take_socket(client_tcp), client or contexts.client, server_side=False, session=session,
        on_session=on_session,
    )
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(tls.do_handshake)
        yield server, tls
    finally:
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(tls)
