"""The data path's own error hierarchy. trio, ssl and OSError exceptions are translated
into these once, where they enter the data path; handlers branch on ours only."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager

import trio

from meshagent.protocol.frames import FrameError


class DataplaneError(Exception):
    """Base class: a problem with one connection; never fatal to the agent."""


class BindError(DataplaneError):
    """A listener could not bind its address (fatal at start, not afterwards)."""


class NoEndpoints(DataplaneError):
    """The outbound's service has no endpoint to try."""


class UpstreamConnectError(DataplaneError):
    """TCP connect to an endpoint failed (refused, unreachable)."""


class UpstreamTimeout(DataplaneError):
    """A connect or handshake took longer than its deadline."""


class HandshakeError(DataplaneError):
    """The TLS handshake failed (bad or missing certificate, garbage, plaintext).

    ``reason``: a short, bounded label (``handshake_reason``) for the metrics."""

    def __init__(self, message: str, reason: str = "other") -> None:
        super().__init__(message)
        self.reason = reason


class Unauthorized(DataplaneError):
    """The peer's identity is not one this side accepts."""


class PeerProtocolError(DataplaneError):
    """The peer broke the agent-to-agent framing."""


# The ends of a proxied connection, as ConnectionBroken names them.
DOWNSTREAM, UPSTREAM = "downstream", "upstream"


class ConnectionBroken(DataplaneError, trio.BrokenResourceError):
    """One end of a proxied connection failed while bytes moved: reset, closed without
    close_notify, bad framing, nothing moved for too long. ``end``: "downstream" (the
    side that connected to this agent), "upstream" (the side this agent connected to),
    or None (neither, or the engine itself: out of memory, idle expiry). The original
    error, when there is one, is the ``__cause__``. A trio.BrokenResourceError too, as
    what a broken stream raises."""

    def __init__(self, text: str, end: str | None) -> None:
        super().__init__(text if end is None else f"{end}: {text}")
        self.end = end


# What a stream raises when it fails (``broken_at`` names the end).
STREAM_ERRORS = (OSError, trio.BrokenResourceError, FrameError)


@contextmanager
def broken_at(end: str) -> Iterator[None]:
    """A stream's failure inside (STREAM_ERRORS) as a ConnectionBroken naming its
    ``end``; one that names its end already goes as it is."""
    try:
        yield
    except ConnectionBroken:
        raise
    except STREAM_ERRORS as exc:
        raise ConnectionBroken(describe_failure(exc), end) from exc


def describe_failure(exc: BaseException) -> str:
    """One short line for one error (``connection.describe`` flattens groups)."""
    if isinstance(exc, (DataplaneError, FrameError)):
        return str(exc)
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return describe_failure(exc.__cause__)
    if isinstance(exc, ssl.SSLEOFError) or getattr(exc, "reason", None) == _EOF_REASON:
        return "the peer closed without close_notify"  # as the C pump says it
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS error: {exc.reason.lower().replace('_', ' ')}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


_EOF_REASON = "UNEXPECTED_EOF_WHILE_READING"  # OpenSSL 3: a TCP FIN without close_notify


@contextmanager
def map_errors(
    *, timeout: type[DataplaneError], failure: type[DataplaneError], what: str
) -> Iterator[None]:
    """Translate trio/ssl/OS errors raised inside into ``timeout`` or ``failure``."""
    try:
        yield
    except trio.TooSlowError:
        if timeout is HandshakeError:
            raise HandshakeError(f"{what}: timed out", "timeout") from None
        raise timeout(f"{what}: timed out") from None
    except (OSError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        if failure is HandshakeError:
            raise HandshakeError(f"{what}: {_describe(cause)}", handshake_reason(cause)) from None
        raise failure(f"{what}: {_describe(cause)}") from None


# OpenSSL's X509_V_ERR_* codes this side meets when it checks the peer's certificate.
_VERIFY_REASONS = {
    2: "unknown-ca",  # unable to get issuer certificate
    9: "not-yet-valid",
    10: "expired",
    18: "unknown-ca",  # self-signed leaf
    19: "unknown-ca",  # self-signed certificate in the chain
    20: "unknown-ca",  # unable to get local issuer certificate
}
# OpenSSL reason names (ssl.SSLError.reason): what the peer told us in an alert, or why
# the bytes were not a handshake at all.
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no-certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no-certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown-ca",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "expired",
    "SSLV3_ALERT_BAD_CERTIFICATE": "bad-certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "bad-certificate",
    "TLSV1_ALERT_DECRYPT_ERROR": "bad-certificate",
    "WRONG_VERSION_NUMBER": "not-tls",
    "HTTP_REQUEST": "not-tls",
    "HTTPS_PROXY_REQUEST": "not-tls",
    "UNEXPECTED_MESSAGE": "not-tls",
    "RECORD_LAYER_FAILURE": "not-tls",
    "PACKET_LENGTH_TOO_LONG": "not-tls",
    "UNSUPPORTED_PROTOCOL": "version-or-cipher",
    "TLSV1_ALERT_PROTOCOL_VERSION": "version-or-cipher",
    "NO_SHARED_CIPHER": "version-or-cipher",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "version-or-cipher",
    "NO_PROTOCOLS_AVAILABLE": "version-or-cipher",
    "NO_APPLICATION_PROTOCOL": "version-or-cipher",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "version-or-cipher",
}

HANDSHAKE_REASONS = (
    "no-certificate",
    "unknown-ca",
    "expired",
    "not-yet-valid",
    "bad-certificate",
    "not-tls",
    "version-or-cipher",
    "closed",
    "timeout",
    "other",
)


def handshake_reason(exc: BaseException | None) -> str:
    """Why a TLS handshake failed, as one of HANDSHAKE_REASONS (a metrics label)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad-certificate")
    if isinstance(exc, ssl.SSLEOFError):
        return "closed"
    if isinstance(exc, ssl.SSLError):
        return _SSL_REASONS.get(str(exc.reason or ""), "other")
    if isinstance(exc, OSError) or exc is None:
        return "closed"
    return "other"


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "connection broken"
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return str(text).lower() if text else type(exc).__name__
