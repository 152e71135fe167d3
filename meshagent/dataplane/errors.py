"""The data path's own error hierarchy. trio, ssl and OSError exceptions are translated
into these once, where they enter the data path; handlers branch on ours only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


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
    """The TLS handshake failed (bad or missing certificate, garbage, plaintext)."""


class Unauthorized(DataplaneError):
    """The peer's identity is not one this side accepts."""


class PeerProtocolError(DataplaneError):
    """The peer broke the agent-to-agent framing."""


@contextmanager
def map_errors(
    *, timeout: type[DataplaneError], failure: type[DataplaneError], what: str
) -> Iterator[None]:
    """Translate trio/ssl/OS errors raised inside into ``timeout`` or ``failure``."""
    try:
        yield
    except trio.TooSlowError:
        raise timeout(f"{what}: timed out") from None
    except (OSError, trio.BrokenResourceError) as exc:
        cause = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
        raise failure(f"{what}: {_describe(cause)}") from None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "connection broken"
    text = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
    return str(text).lower() if text else type(exc).__name__
