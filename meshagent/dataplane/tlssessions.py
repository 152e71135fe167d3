"""Cheaper TLS session resumption between agents, through the C extension (``_pump.c``).

Why. With OpenSSL 3.0 every parse of a session builds a decoder for the peer's public
key, and the ``ssl`` module parses sessions twice per resumed connection: the client's
``SSLSocket.session = s`` copies ``s`` through DER, and a server with stateless TLS 1.3
tickets parses the ticket back into a session. Measured on one core, a resumed
handshake cost the client 1,230 µs and the server 1,650 µs; with these helpers 770 and
850 µs (docs/architecture.md).

* ``own`` gives a kept client session a private copy (``SSL_SESSION_dup``, nothing
  parsed). ``SSLSocket.session`` shares the connection's session, which OpenSSL marks
  unresumable when that connection is freed without a shutdown: the reason the ``ssl``
  module copies through DER.
* ``resume`` hands a connection, before its handshake, a copy of a kept session
  (``SSL_SESSION_dup`` again), so the kept one never belongs to a connection.
* ``stateful_server`` makes a server context issue stateful tickets (the session stays
  in the context's cache, bounded to ``SERVER_SESSIONS``), so a resumption finds it
  in memory: for an agent without worker processes. A stateful session resumes only
  in the process that issued it, so with workers ``shared_tickets`` keeps stateless
  tickets (parsed on every resumption) under keys every worker derives alike, and a
  ticket resumes in any of them. A client whose ticket was refused (the peer
  restarted, or renewed its certificate) takes the new one
  (``TlsContexts.wants_session``).
* ``keep_on_close``: OpenSSL drops the session of a connection freed without a
  shutdown from the cache, which with stateful tickets would cost every client a full
  handshake; a connection that ends without close_notify is marked as shut down first
  (as nginx does).

Without the extension (or with ``MESHAGENT_NATIVE_PUMP=0``), or when a layout check in
C fails, each helper does what the ``ssl`` module does (stateless tickets, DER copies).
"""

from __future__ import annotations

import ssl
from typing import Any, Final

from meshagent.dataplane import nativepump
from meshagent.log import get_logger

log = get_logger("tls")

# Sessions a server context keeps (OpenSSL's default is 20,480). One per full handshake
# of each client identity and worker, renewed once a minute (tls.SESSION_REFRESH_SECONDS):
# far below this unless thousands of client agents connect to one inbound.
SERVER_SESSIONS: Final = 2048

_native: bool | None = None  # None: not tried yet


def _pump() -> Any:
    """The extension module when its TLS helpers work here, else None (why, logged once)."""
    global _native
    if _native is None:
        problem = nativepump.native_problem()
        _native = problem is None
        if problem is not None:
            log.info("tls sessions kind=python", why=problem)
    return nativepump._pump if _native else None  # type: ignore[attr-defined]


def _sslobj(sock: ssl.SSLSocket) -> object:
    """The ``_ssl._SSLSocket`` under an ``ssl.SSLSocket`` (what the C side reads)."""
    return sock._sslobj  # type: ignore[attr-defined]


def _failed(what: str, exc: Exception) -> None:
    """A helper failed its layout check: stop using them all (one warning)."""
    global _native
    _native = False
    log.warning("tls sessions kind=python", why=f"{what}: {exc}")


def stateful_server(ctx: ssl.SSLContext) -> bool:
    """Switch a new server context to stateful tickets; False when it keeps stateless
    ones (the helpers are not available)."""
    pump = _pump()
    if pump is None:
        return False
    ctx.options |= ssl.OP_NO_TICKET
    try:
        pump.tls_server_cache(ctx, ctx.options, SERVER_SESSIONS)
    except (RuntimeError, TypeError) as exc:
        ctx.options &= ~ssl.OP_NO_TICKET
        _failed("server session cache", exc)
        return False
    return True


def shared_tickets(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Make a new server context encrypt its (stateless) tickets with ``keys``, which
    every process of the agent derives alike (``tls.ticket_keys``): a ticket then
    resumes in any worker. False when the helpers are not available (each process keeps
    a random key of its own)."""
    pump = _pump()
    if pump is None:
        return False
    try:
        pump.tls_ticket_keys(ctx, ctx.options, keys)
    except (RuntimeError, TypeError) as exc:
        _failed("ticket keys", exc)
        return False
    return True


def own(session: ssl.SSLSession) -> None:
    """Before a client session is kept: give it a copy of its own."""
    pump = _pump()
    if pump is None:
        return
    try:
        pump.tls_own_session(session, session.id)
    except (RuntimeError, TypeError) as exc:
        _failed("own session", exc)


def resume(sock: ssl.SSLSocket, session: ssl.SSLSession) -> None:
    """What ``sock.session = session`` does (before the handshake), without the DER copy.

    Raises:
        ValueError: ``session`` belongs to another context, or OpenSSL refused it.
    """
    pump = _pump()
    if pump is not None and session.id:
        try:
            pump.tls_set_session(_sslobj(sock), sock.fileno(), session, session.id)
            return
        except (RuntimeError, TypeError) as exc:
            _failed("resume", exc)
    sock.session = session


def keep_on_close(sock: ssl.SSLSocket) -> None:
    """Before closing a connection that sends no close_notify: keep its session
    resumable (see the module docstring)."""
    pump = _pump()
    if pump is None:
        return
    try:
        pump.tls_keep_on_close(_sslobj(sock), sock.fileno())
    except (RuntimeError, TypeError, AttributeError) as exc:
        _failed("keep on close", exc)
