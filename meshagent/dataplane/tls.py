"""TLS settings of the data path: one server and one client context per identity.

* TLS 1.3 preferred, 1.2 minimum; on 1.2 only ECDHE with AEAD ciphers.
* Both sides require a certificate chained to the mesh CA; hostnames are not checked —
  the SPIFFE ID in the URI SAN is, by ``check_peer``.
* Contexts are built once per identity and swapped whole (``swap``) when certificates
  are renewed; a connection keeps the context it started with.
* Session resumption (TLS 1.3 tickets): a server sends one ticket per handshake; a client
  keeps a session per (identity, peer) and offers it on its next connections there,
  which then skip both certificate signatures and their checks. Taking a session from a
  connection pauses its C pump for a trip through Python, so a kept session is only
  replaced once it is ``SESSION_REFRESH_SECONDS`` old, or when the peer refused it; a
  ticket may be used many times. Giving it to a connection and resuming on the server
  are cheap when the C helpers work (``tlssessions``: stateful tickets in the server
  context's cache, copies without parsing). A session is offered only with the context
  that made it, so a swap (renewal, a new trust bundle) starts over with full
  handshakes; the server's sessions live in its context too.
  The identities a resumed session carries are the ones verified at its full handshake,
  at most the ticket's lifetime ago (OpenSSL's default, 2 hours; leaf certificates live
  24 hours); ``check_peer`` and the permissions still run on every connection.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

from meshagent.dataplane import tlssessions
from meshagent.dataplane.errors import Unauthorized
from meshagent.pki.identity import identities_from_peercert
from meshagent.protocol.frames import ALPN, ALPN_STREAMS

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
    ctx.set_alpn_protocols([ALPN_STREAMS, ALPN])  # the newest both agents speak
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    return ctx


@dataclass(frozen=True, slots=True)
class _Kept:
    context: ssl.SSLContext
    session: ssl.SSLSession
    since: float  # time.monotonic()


def server_context(files: IdentityFiles, *, ticket_secret: bytes | None = None) -> ssl.SSLContext:
    """``ticket_secret``: shared by the agent's processes (workers), whose contexts then
    encrypt tickets alike; None: one process, stateful tickets (``tlssessions``)."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), files)
    ctx.num_tickets = 1  # a client keeps one session per peer (OpenSSL sends 2)
    if ticket_secret is None:
        tlssessions.stateful_server(ctx)
    else:
        tlssessions.shared_tickets(ctx, ticket_keys(ticket_secret, files))
    return ctx


def ticket_keys(secret: bytes, files: IdentityFiles) -> bytes:
    """The 80 bytes that encrypt a server context's tickets: the same in every process
    with ``secret`` and these files, new ones with new certificates."""
    files_digest = hashlib.sha256()
    for path in (files.ca, files.cert):
        files_digest.update(Path(path).read_bytes())
    return hashlib.shake_256(secret + b"meshagent tickets" + files_digest.digest()).digest(80)


def client_context(files: IdentityFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _base(ctx, files)


# Sessions kept for resumption, across all identities and peers (the oldest goes first).
MAX_SESSIONS = 4096
# A kept session is replaced by a newer one at most this often (far below OpenSSL's
# ticket lifetime, 2 hours).
SESSION_REFRESH_SECONDS = 60.0


class TlsContexts:
    """The server and client contexts for every identity this host holds, and the
    client sessions to resume."""

    def __init__(
        self, identities: Mapping[str, IdentityFiles], *, ticket_secret: bytes | None = None
    ) -> None:
        """``ticket_secret``: the one the agent gave its workers (``server_context``)."""
        self._ticket_secret = ticket_secret
        self._server: dict[str, ssl.SSLContext] = {}
        self._client: dict[str, ssl.SSLContext] = {}
        self._sessions: OrderedDict[tuple[str, Hashable], _Kept] = OrderedDict()
        self.swap(identities)

    def swap(self, identities: Mapping[str, IdentityFiles]) -> None:
        """Rebuild every context from ``identities``; open connections are untouched."""
        secret = self._ticket_secret
        server = {
            name: server_context(files, ticket_secret=secret) for name, files in identities.items()
        }
        client = {name: client_context(files) for name, files in identities.items()}
        self._server, self._client = server, client

    def server(self, service: str) -> ssl.SSLContext:
        return self._server[service]

    def client(self, service: str) -> ssl.SSLContext:
        return self._client[service]

    def session(
        self, context: ssl.SSLContext, service: str, peer: Hashable
    ) -> ssl.SSLSession | None:
        """The session to offer ``peer`` on a new connection of ``service`` made with
        ``context``, if one made with that same context is kept."""
        kept = self._sessions.get((service, peer))
        if kept is None or kept.context is not context:
            return None
        return kept.session

    def wants_session(
        self, context: ssl.SSLContext, service: str, peer: Hashable, *, refused: bool = False
    ) -> bool:
        """Whether a new connection to ``peer`` should hand its session over
        (``keep_session``): none is kept for ``context``, the peer ``refused`` the kept
        one (another worker of the peer, or it restarted), or the kept one is due."""
        kept = self._sessions.get((service, peer))
        return (
            kept is None
            or kept.context is not context
            or refused
            or time.monotonic() - kept.since >= SESSION_REFRESH_SECONDS
        )

    def keep_session(
        self, context: ssl.SSLContext, service: str, peer: Hashable, session: ssl.SSLSession
    ) -> None:
        """Remember ``session`` (made with ``context``) for the next connections to ``peer``."""
        tlssessions.own(session)
        key = (service, peer)
        self._sessions[key] = _Kept(context, session, time.monotonic())
        self._sessions.move_to_end(key)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def forget_session(self, service: str, peer: Hashable) -> None:
        """Drop the session for ``peer`` (it failed to resume, or the peer misbehaved)."""
        self._sessions.pop((service, peer), None)


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
