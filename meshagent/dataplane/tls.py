"""TLS settings of the data path: one server and one client context per identity.

* TLS 1.3 preferred, 1.2 minimum; on 1.2 only ECDHE with AEAD ciphers.
* Both sides require a certificate chained to the mesh CA; hostnames are not checked —
  the SPIFFE ID in the URI SAN is, by ``check_peer``.
* Contexts are built once per identity and swapped whole (``swap``) when certificates
  are renewed; a connection keeps the context it started with.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from meshagent.dataplane.errors import Unauthorized
from meshagent.pki.identity import identities_from_peercert
from meshagent.protocol.frames import ALPN

_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!MD5:!DSS"


@dataclass(frozen=True, slots=True)
class IdentityFiles:
    ca: str
    cert: str
    key: str


def _base(ctx: ssl.SSLContext, files: IdentityFiles) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=files.ca)
    ctx.load_cert_chain(files.cert, files.key)
    ctx.set_alpn_protocols([ALPN])
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return ctx


def server_context(files: IdentityFiles) -> ssl.SSLContext:
    return _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)


def client_context(files: IdentityFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _base(ctx, files)


class TlsContexts:
    """The server and client contexts for every identity this host holds."""

    def __init__(self, identities: Mapping[str, IdentityFiles]) -> None:
        self._server: dict[str, ssl.SSLContext] = {}
        self._client: dict[str, ssl.SSLContext] = {}
        self.swap(identities)

    def swap(self, identities: Mapping[str, IdentityFiles]) -> None:
        """Rebuild every context from ``identities``; open connections are untouched."""
        server = {name: server_context(files) for name, files in identities.items()}
        client = {name: client_context(files) for name, files in identities.items()}
        self._server, self._client = server, client

    def server(self, service: str) -> ssl.SSLContext:
        return self._server[service]

    def client(self, service: str) -> ssl.SSLContext:
        return self._client[service]


def check_peer(peercert: Mapping[str, object] | None, *, mesh: str, service: str | None) -> str:
    """Return the peer's SPIFFE ID if it belongs to ``mesh`` (and is ``service``, if given).

    Raises:
        Unauthorized: no SPIFFE ID, another mesh, or another service.
    """
    ids = [i for i in identities_from_peercert(peercert or {}) if i.startswith("spiffe://")]
    if not ids:
        raise Unauthorized("peer certificate has no spiffe:// identity")
    prefix = f"spiffe://{mesh}/service/"
    for identity in ids:
        if identity.startswith(prefix) and (service is None or identity == prefix + service):
            return identity
    wanted = prefix + (service or "*")
    raise Unauthorized(f"peer is {ids[0]}, expected {wanted}")
