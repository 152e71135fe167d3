"""Loopback TLS helpers: a mesh CA's server and client contexts, a connected TCP pair."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trio

from meshagent.dataplane.tls import client_context, server_context
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
