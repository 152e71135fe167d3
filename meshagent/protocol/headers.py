"""Header lists for the HTTP/1 proxy: pure functions, no parsing, no I/O.

A header list (``Headers``) is a tuple of ``(name, value)`` byte pairs in wire order, names
in the case they arrived in (some legacy apps care), values without surrounding whitespace:
what ``protocol.http1`` produces and serialises. Every function here compares names
case-insensitively, never mutates its input, and returns the same tuple object when it has
nothing to change, so the proxy pays almost nothing for a request that needs no rewrite.

What a proxy must do to a message it forwards (RFC 9110 §7.6.1):

* drop the hop-by-hop fields (``HOP_BY_HOP``, every ``Proxy-*`` field, and every field the
  ``Connection`` header names), because they describe one connection, not the message;
  ``strip_hop_by_hop(..., keep_upgrade=True)`` keeps ``Upgrade`` and a single
  ``Connection: upgrade`` when the proxy passes a protocol switch through;
* never let ``Connection`` remove ``Host`` or ``Content-Length`` (``PROTECTED``): a client
  that lists them would make the proxy forward a body the upstream cannot frame;
* record the client in ``X-Forwarded-For`` (``append_forwarded_for``), and in an RFC 7239
  ``Forwarded`` field when the request already carries one, and remove the mesh's
  own headers when they arrive from outside (``remove_headers``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final, TypeAlias

Headers: TypeAlias = tuple[tuple[bytes, bytes], ...]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
"""Lower-case names that never cross a proxy (besides every ``proxy-*`` name)."""

PROTECTED: Final = frozenset({b"host", b"content-length"})
"""Names a ``Connection`` header may not nominate for removal (framing and routing)."""

FORWARDED_FOR: Final = b"X-Forwarded-For"
FORWARDED: Final = b"Forwarded"
_OWS: Final = b" \t"


def get_header(headers: Headers, name: bytes) -> bytes | None:
    """The value of the first field called ``name`` (any case), or None. Pure."""
    wanted = name.lower()
    for field, value in headers:
        if field.lower() == wanted:
            return value
    return None


def get_all_headers(headers: Headers, name: bytes) -> tuple[bytes, ...]:
    """The values of every field called ``name`` (any case), in wire order. Pure."""
    wanted = name.lower()
    return tuple(value for field, value in headers if field.lower() == wanted)


def header_tokens(headers: Headers, name: bytes) -> tuple[bytes, ...]:
    """The comma-separated tokens of every field called ``name``, lower-cased, without blanks.

    For list-valued fields compared case-insensitively (``Connection``, ``Transfer-Encoding``):
    ``Connection: Keep-Alive, Upgrade`` gives ``(b"keep-alive", b"upgrade")``. Pure.
    """
    tokens: list[bytes] = []
    for value in get_all_headers(headers, name):
        for token in value.split(b","):
            token = token.strip(_OWS)
            if token:
                tokens.append(token.lower())
    return tuple(tokens)


def add_header(headers: Headers, name: bytes, value: bytes) -> Headers:
    """``headers`` with ``name: value`` appended (other fields of that name stay). Pure."""
    return (*headers, (name, value))


def set_header(headers: Headers, name: bytes, value: bytes) -> Headers:
    """``headers`` with exactly one ``name`` field, holding ``value``.

    The first existing field of that name is replaced where it stands (spelled ``name``), the
    others are dropped; without one, the field is appended. Pure.
    """
    wanted = name.lower()
    out: list[tuple[bytes, bytes]] = []
    placed = False
    for field in headers:
        if field[0].lower() == wanted:
            if not placed:
                out.append((name, value))
                placed = True
        else:
            out.append(field)
    if not placed:
        out.append((name, value))
    return tuple(out)


def remove_headers(headers: Headers, names: Collection[bytes]) -> Headers:
    """``headers`` without any field whose name (any case) is in ``names``. Pure.

    The proxy uses it to drop the mesh's own headers (``x-meshagent-source``) when they arrive
    from outside the mesh, so that nobody can claim an identity they do not have.
    """
    if not names:
        return headers
    wanted = {name.lower() for name in names}
    kept = tuple(field for field in headers if field[0].lower() not in wanted)
    return headers if len(kept) == len(headers) else kept


def strip_hop_by_hop(headers: Headers, *, keep_upgrade: bool = False) -> Headers:
    """``headers`` without the fields that describe the connection rather than the message.

    Removed: the ``HOP_BY_HOP`` names, every ``Proxy-*`` field, and every field the
    ``Connection`` header lists, except ``PROTECTED`` ones (a client cannot make the proxy drop
    ``Host`` or ``Content-Length``).

    Args:
        headers: the fields as parsed.
        keep_upgrade: the proxy passes a protocol switch (``Upgrade`` request or its 101
            response) through: every ``Upgrade`` field stays and, if there is one, a single
            ``Connection: upgrade`` is appended.

    Returns:
        The remaining fields in their order (the same tuple when nothing was removed). Pure.
    """
    nominated: set[bytes] = set()
    lowered = [field[0].lower() for field in headers]
    for lname, (_, value) in zip(lowered, headers, strict=True):
        if lname == b"connection":
            for token in value.split(b","):
                token = token.strip(_OWS).lower()
                if token and token not in PROTECTED:
                    nominated.add(token)
    kept: list[tuple[bytes, bytes]] = []
    upgrade_kept = False
    for lname, field in zip(lowered, headers, strict=True):
        if lname in HOP_BY_HOP or lname in nominated or lname.startswith(b"proxy-"):
            if keep_upgrade and lname == b"upgrade":
                kept.append(field)
                upgrade_kept = True
            continue
        kept.append(field)
    if upgrade_kept:
        kept.append((b"Connection", b"upgrade"))
    elif len(kept) == len(headers):
        return headers
    return tuple(kept)


def append_forwarded_for(headers: Headers, client: bytes) -> Headers:
    """``headers`` with ``client`` (an address, as bytes) added to ``X-Forwarded-For``.

    Existing ``X-Forwarded-For`` fields are joined into one, in order, with ``client`` last,
    placed where the first one stood; without one, the field is appended. Pure.
    """
    existing = get_all_headers(headers, FORWARDED_FOR)
    if not existing:
        headers = (*headers, (FORWARDED_FOR, client))
    else:
        headers = set_header(headers, FORWARDED_FOR, b", ".join((*existing, client)))
    forwarded = get_all_headers(headers, FORWARDED)
    if not forwarded:  # not created: X-Forwarded-For is what legacy apps read
        return headers
    node = b'"[' + client + b']"' if b":" in client else client  # IPv6 is quoted (RFC 7239)
    return set_header(headers, FORWARDED, b", ".join((*forwarded, b"for=" + node)))
