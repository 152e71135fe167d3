"""HTTP/1.1 for the proxy: llhttp parses heads and chunks, this module decides the framing.

Theory of operation. The HTTP proxy moves messages between a downstream and an upstream
without ever holding a body whole. ``RequestParser`` (fed what the downstream sends) and
``ResponseParser`` (fed what the upstream sends) turn bytes into events::

    RequestHead | ResponseHead, then Body*, then EndOfMessage         one message
    ResponseHead with a 1xx status other than 101                     informational: nothing follows
    ResponseHead 101, or 2xx to CONNECT, then Upgraded(leftover)      the connection is a tunnel now

llhttp (through httptools) is fast and strict, but through httptools it cannot be told the
request method a response answers (it would read the body of a response to HEAD out of the
next response), cannot be paused, never says how far it read, and skips the body of any
Upgrade request. So llhttp never decides where a message ends here:

1. A head ends at the first CRLF CRLF: llhttp rejects bare LF line ends, so it agrees. The
   parser finds it with ``bytes.find``, checks the limits, and feeds llhttp exactly that head.
   llhttp validates the syntax (tokens, versions, CL/TE conflicts, obs-fold, stray whitespace)
   and hands back the fields; nothing is parsed in a Python loop over bytes. An incomplete head
   holding a bare CR or LF fails at once rather than wait for a CRLF CRLF that cannot come.
2. This module decides the framing from the head (RFC 9112 §6.3, and for a response the request
   method given to ``ResponseParser.expect``): a response to HEAD, a 1xx, 204 and 304 have no
   body whatever their headers say; 101 and a 2xx to CONNECT start a tunnel; otherwise
   ``Transfer-Encoding: chunked`` means chunked, ``Content-Length`` that many bytes, and nothing
   means no body for a request and "until the connection closes" for a response.
3. Content-Length and until-close bodies are sliced here, without llhttp: a feed that is all
   body comes back as the very same bytes object, so large bodies are not copied at all.
4. Chunked bodies go through llhttp (the one body copy is httptools'). A chunked message can
   only end right after a CRLF CRLF that follows a non-empty line, so the parser feeds llhttp up
   to each such place in turn (``bytes.find`` again); when llhttp reports the message complete,
   the parser knows exactly where the next message starts. Body bytes that happen to look like
   an end only cost an extra call, as a tiny chunk would.
5. An llhttp instance is kept while it rests at a message boundary. When it would expect a body
   this module does not feed it, or it paused on an upgrade, it is dropped and a new one (about
   0.4 µs) parses the next head. An Upgrade request with a chunked body gets a fresh llhttp
   primed into the chunked state by a synthetic head, because httptools made llhttp skip it.

Driving it (the trio shell, ``dataplane/http_proxy.py``): feed the downstream's bytes to a
``RequestParser``; on a ``RequestHead`` pick the route, call ``responses.expect(head.method,
upgrade=head.upgrade is not None)`` and send ``serialize_request_head(head, headers=...)``
upstream; relay ``Body`` pieces (through ``serialize_chunk`` when chunked) and the end
(``LAST_CHUNK`` / ``serialize_last_chunk``); feed the upstream's bytes to a ``ResponseParser``
the same way. On ``HttpError`` answer ``error_response(error.status, error.reason)`` and close.

Protocol switches are decided by the peer's answer, as in h11. After an Upgrade or CONNECT
request, ``RequestParser`` delivers the request and then holds further bytes unread until the
proxy knows the answer: ``accept_upgrade()`` (the upstream said 101 / 2xx) returns them as
``Upgraded(leftover)``; ``decline_upgrade()`` resumes HTTP parsing. ``ResponseParser`` switches
by itself on 101 (only if ``expect`` was told the request asked to upgrade) and on a 2xx to
CONNECT; bytes after that head are the tunnel's (``Upgraded.leftover``).

Errors are ``HttpError(status, reason)``: the status the proxy should answer with. Requests:
400 malformed or ambiguous framing, 413 body over ``max_body_bytes``, 414 request line over
``max_line_bytes`` (RFC 9112 §3: the target is what makes a line long), 431 header section or
trailers over ``max_header_bytes`` / ``max_headers``, 501 unknown method or transfer coding,
505 a well-formed version other than 1.0 / 1.1. Responses: always 502 (the upstream broke the
protocol; the reason says how). Events completed in the same call before the error ride on
``HttpError.events`` (earlier pipelined requests still deserve their answers).

Invariants:
* Every byte fed is accounted for exactly once: head, body, chunk framing, a blank line between
  messages (ignored), held while an upgrade is undecided, tunnel leftover, or dropped after a
  message that closes the connection (RFC 9112 §9.6: no request after ``close`` is processed).
* Memory per parser is bounded: an incomplete head by ``max_line_bytes + max_header_bytes``,
  held bytes by ``max_header_bytes``, chunk framing and trailers by ``max_header_bytes``
  (llhttp's own partial field), bodies by nothing because they are never buffered.
* Framing is never guessed (request smuggling): Content-Length with Transfer-Encoding, repeated
  or non-numeric Content-Length, a transfer coding other than exactly ``chunked``,
  Transfer-Encoding in an HTTP/1.0 request, a missing or repeated Host, bare LF, obs-fold and a
  bad chunk size are errors.
* After an ``HttpError`` the parser is dead (every later call raises it again): the proxy sends
  the error response and closes the connection.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from http import HTTPStatus
from typing import Any, Final, TypeAlias

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
    HttpRequestParser,
    HttpResponseParser,
)

from meshagent.protocol.headers import Headers

# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one parser accepts; the defaults suit a service mesh sidecar.

    Attributes:
        max_header_bytes: field lines of one head (after the start line, without the blank
            line that ends it), of one trailer section, and of chunk framing between body
            bytes; default 64 KiB. Over it: 431.
        max_headers: fields in one head or trailer section; default 100. Over it: 431.
        max_line_bytes: the request line or status line, without its CRLF; default 8 KiB.
            Over it: 414 (request), 502 (response).
        max_body_bytes: body bytes of one message, or None (default) for no limit. Over it:
            413 (request; a too-large Content-Length fails at the head), 502 (response).
    """

    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    max_line_bytes: int = 8 * 1024
    max_body_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_headers", "max_line_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1, got {getattr(self, name)}")
        if self.max_body_bytes is not None and self.max_body_bytes < 0:
            raise ValueError(f"Limits.max_body_bytes must be >= 0, got {self.max_body_bytes}")


DEFAULT_LIMITS: Final = Limits()


class Framing(enum.Enum):
    """How a message's body is delimited (RFC 9112 §6.3)."""

    NONE = "none"
    CONTENT_LENGTH = "content-length"
    CHUNKED = "chunked"
    UNTIL_CLOSE = "until-close"


@dataclass(frozen=True, slots=True)
class BodyKind:
    """A message's body framing; ``content_length`` (bytes) is set for CONTENT_LENGTH only."""

    framing: Framing
    content_length: int | None = None


NO_BODY: Final = BodyKind(Framing.NONE)
CHUNKED_BODY: Final = BodyKind(Framing.CHUNKED)
UNTIL_CLOSE_BODY: Final = BodyKind(Framing.UNTIL_CLOSE)


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request line and its header fields.

    Attributes:
        method: as sent (methods are case-sensitive), e.g. ``b"GET"``.
        target: the request target as sent (origin-form ``/a?b``, absolute-form, ``host:port``
            for CONNECT, ``*``).
        http_version: ``b"1.1"`` or ``b"1.0"``.
        headers: the fields in wire order, names as sent, values without surrounding spaces.
        keep_alive: the client lets the connection carry another request after this one.
        upgrade: the ``Upgrade`` field's value when the request asks to switch protocols
            (HTTP/1.1 with ``Connection: upgrade``), else None.
        expect_continue: ``Expect: 100-continue`` (HTTP/1.1): the client waits for a 100 or a
            final response before sending the body.
        body: how the body is framed.
    """

    method: bytes
    target: bytes
    http_version: bytes = b"1.1"
    headers: Headers = ()
    keep_alive: bool = True
    upgrade: bytes | None = None
    expect_continue: bool = False
    body: BodyKind = NO_BODY

    @property
    def may_switch_protocols(self) -> bool:
        """Upgrade or CONNECT: the parser holds later bytes until the proxy knows the answer."""
        return self.upgrade is not None or self.method == b"CONNECT"


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A status line and its header fields (see ``RequestHead`` for the common attributes).

    ``reason`` is the reason phrase as sent (may be empty). ``keep_alive`` is false when the
    response closes the connection: ``Connection: close``, HTTP/1.0 without keep-alive, a body
    delimited by the close, or a switch to a tunnel.
    """

    status: int
    reason: bytes = b""
    http_version: bytes = b"1.1"
    headers: Headers = ()
    keep_alive: bool = True
    body: BodyKind = NO_BODY

    @property
    def is_informational(self) -> bool:
        """A 1xx: no body and no EndOfMessage follow; 101 is followed by Upgraded."""
        return self.status < 200


@dataclass(frozen=True, slots=True)
class Body:
    """The next piece of the current message's body (never empty)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The current message is complete; ``trailers`` are a chunked body's trailer fields."""

    trailers: Headers = ()


@dataclass(frozen=True, slots=True)
class Upgraded:
    """From here on the connection is an opaque tunnel (after 101, or 2xx to CONNECT).

    ``leftover`` holds the bytes already received past the HTTP message: the tunnel's first
    bytes, to be forwarded before anything read later.
    """

    leftover: bytes


Event: TypeAlias = RequestHead | ResponseHead | Body | EndOfMessage | Upgraded


class HttpError(Exception):
    """The peer broke HTTP/1.1 or a limit; the connection must be closed after answering.

    Attributes:
        status: what the proxy should answer with (400, 413, 414, 431, 501, 505; 502 for
            anything wrong with an upstream's response).
        reason: one line saying what was wrong, fit for a log and an error body.
        events: events the same call completed before the error, in order (for example an
            earlier pipelined request, which still deserves its response).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.events: list[Event] = []

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def _new_request_head(
    method: bytes,
    target: bytes,
    http_version: bytes,
    headers: Headers,
    keep_alive: bool,
    upgrade: bytes | None,
    expect_continue: bool,
    body: BodyKind,
) -> RequestHead:
    """``RequestHead(...)`` at half the cost (the parser makes one per request).

    A frozen dataclass ``__init__`` assigns each field through ``object.__setattr__``; setting
    the slots through their descriptors skips that. Same object, same equality.
    """
    head = _new(RequestHead)
    _SET_METHOD(head, method)
    _SET_TARGET(head, target)
    _SET_REQUEST_VERSION(head, http_version)
    _SET_REQUEST_HEADERS(head, headers)
    _SET_REQUEST_KEEP_ALIVE(head, keep_alive)
    _SET_UPGRADE(head, upgrade)
    _SET_EXPECT_CONTINUE(head, expect_continue)
    _SET_REQUEST_BODY(head, body)
    return head


def _new_response_head(
    status: int,
    reason: bytes,
    http_version: bytes,
    headers: Headers,
    keep_alive: bool,
    body: BodyKind,
) -> ResponseHead:
    """``ResponseHead(...)`` at half the cost, as ``_new_request_head``."""
    head = _new(ResponseHead)
    _SET_STATUS(head, status)
    _SET_REASON(head, reason)
    _SET_RESPONSE_VERSION(head, http_version)
    _SET_RESPONSE_HEADERS(head, headers)
    _SET_RESPONSE_KEEP_ALIVE(head, keep_alive)
    _SET_RESPONSE_BODY(head, body)
    return head


_new = object.__new__
_Setter: TypeAlias = Callable[[Any, Any], None]
(
    _SET_METHOD,
    _SET_TARGET,
    _SET_REQUEST_VERSION,
    _SET_REQUEST_HEADERS,
    _SET_REQUEST_KEEP_ALIVE,
    _SET_UPGRADE,
    _SET_EXPECT_CONTINUE,
    _SET_REQUEST_BODY,
) = tuple[_Setter, ...](getattr(RequestHead, field.name).__set__ for field in fields(RequestHead))
(
    _SET_STATUS,
    _SET_REASON,
    _SET_RESPONSE_VERSION,
    _SET_RESPONSE_HEADERS,
    _SET_RESPONSE_KEEP_ALIVE,
    _SET_RESPONSE_BODY,
) = tuple[_Setter, ...](getattr(ResponseHead, field.name).__set__ for field in fields(ResponseHead))


# --------------------------------------------------------------------------- serialisers

LAST_CHUNK: Final = b"0\r\n\r\n"
_REASONS: Final = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def _serialize(start_line: bytes, headers: Headers) -> bytes:
    lines = [start_line]
    lines += [name + b": " + value for name, value in headers]
    lines.append(b"\r\n")
    out = b"\r\n".join(lines)
    # One LF and one CR per line, or a field smuggled a line break in (header injection).
    if out.count(b"\n") != len(lines) or out.count(b"\r") != len(lines):
        raise ValueError("CR or LF inside a start line or header field")
    return out


def serialize_request_head(head: RequestHead, *, headers: Headers | None = None) -> bytes:
    """The wire form of ``head``: request line, fields, blank line. Pure.

    Args:
        head: method, target and version come from here.
        headers: the fields to write instead of ``head.headers`` (after the proxy stripped
            and added some). They are written as given: the caller keeps the framing fields
            (``Content-Length`` / ``Transfer-Encoding: chunked``) true to the body it sends.

    Raises:
        ValueError: a field or the request line contains CR or LF.
    """
    start = head.method + b" " + head.target + b" HTTP/" + head.http_version
    return _serialize(start, head.headers if headers is None else headers)


def serialize_response_head(head: ResponseHead, *, headers: Headers | None = None) -> bytes:
    """The wire form of ``head``: status line, fields, blank line. Pure.

    Args:
        head: status, reason and version come from here.
        headers: the fields to write instead of ``head.headers`` (see
            ``serialize_request_head``).

    Raises:
        ValueError: a field or the reason contains CR or LF.
    """
    start = b"HTTP/%s %d %s" % (head.http_version, head.status, head.reason)
    return _serialize(start, head.headers if headers is None else headers)


def serialize_chunk(data: bytes) -> bytes:
    """One chunk carrying ``data``; empty data gives b"" (an empty chunk would end the body).

    Pure. End the body with ``LAST_CHUNK`` or ``serialize_last_chunk(trailers)``.
    """
    if not data:
        return b""
    return b"%x\r\n%s\r\n" % (len(data), data)


def serialize_last_chunk(trailers: Headers = ()) -> bytes:
    """The last chunk with ``trailers`` (``LAST_CHUNK`` when there are none). Pure.

    Raises:
        ValueError: a trailer field contains CR or LF.
    """
    if not trailers:
        return LAST_CHUNK
    return _serialize(b"0", trailers)


def error_response(status: int, body_text: str, *, close: bool = True) -> bytes:
    """A complete HTTP/1.1 response: ``status``, a text/plain ``body_text``, Content-Length.

    Args:
        status: 200..599 except 204 and 304 (which cannot carry the text).
        body_text: encoded as UTF-8; a newline is added if it does not end with one.
        close: add ``Connection: close`` (the default: after a protocol error the proxy
            cannot trust the connection).

    Raises:
        ValueError: ``status`` cannot carry a body.
    """
    if not 200 <= status <= 599 or status in (204, 304):
        raise ValueError(f"status {status} cannot carry an error body")
    body = body_text.encode("utf-8")
    if not body.endswith(b"\n"):
        body += b"\n"
    head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b""))
    head += b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body)
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


# --------------------------------------------------------------------------- parsing

_CRLF2: Final = b"\r\n\r\n"
_NOT_CRLF: Final = re.compile(rb"[^\r\n]")
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")


class _State(enum.Enum):
    HEAD = "awaiting a head"
    LENGTH = "in a Content-Length body"
    CHUNKED = "in a chunked body"
    UNTIL_CLOSE = "in a body delimited by the close"
    PAUSED = "holding bytes until the proxy decides on an upgrade"
    TUNNEL = "switched to a tunnel"
    DONE = "no further message on this connection"


_HEAD: Final = _State.HEAD
_LENGTH: Final = _State.LENGTH
_CHUNKED: Final = _State.CHUNKED
_UNTIL_CLOSE: Final = _State.UNTIL_CLOSE
_PAUSED: Final = _State.PAUSED
_TUNNEL: Final = _State.TUNNEL
_DONE: Final = _State.DONE


class _SecondMessage(Exception):
    """llhttp began another message inside bytes this module framed as one (never expected)."""


class _Collector:
    """llhttp's callback target: the fields of one head, then its chunked body and trailers.

    The callbacks are the parser's per-field hot path: they keep the fields and set aside the
    few that decide framing (by a length test first, so most fields cost no ``lower()``).
    """

    __slots__ = (
        "begun",
        "body_bytes",
        "completed",
        "events",
        "fields",
        "framing_fields",
        "head_fields",
        "target",
    )

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.reset()

    def reset(self) -> None:
        self.begun = False
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []  # the head's, then the trailers
        self.head_fields: list[tuple[bytes, bytes]] | None = None  # once the head is complete
        self.framing_fields: list[tuple[bytes, bytes]] = []  # (lower-case name, value)
        self.body_bytes = 0
        self.completed = False

    def on_message_begin(self) -> None:
        if self.begun:
            raise _SecondMessage
        self.begun = True

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_status(self, reason: bytes) -> None:
        self.target += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if value and value[-1] <= 32:  # SP or HTAB (llhttp rejects other controls)
            value = value.rstrip(b" \t")  # llhttp drops leading OWS but keeps trailing OWS
        self.fields.append((name, value))
        if len(name) in _FRAMING_FIELD_LENGTHS:
            lname = name.lower()
            if lname in _FRAMING_FIELDS:
                self.framing_fields.append((lname, value))

    def on_headers_complete(self) -> None:
        self.head_fields = self.fields
        self.fields = []

    def on_body(self, body: bytes) -> None:
        self.events.append(Body(body))
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        self.completed = True


_FRAMING_FIELDS: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect", b"host"}
)
_FRAMING_FIELD_LENGTHS: Final = frozenset(len(name) for name in _FRAMING_FIELDS)


def _group(fields: list[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    """Values by (lower-case) name, in wire order."""
    grouped: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        if name in grouped:
            grouped[name].append(value)
        else:
            grouped[name] = [value]
    return grouped


def _tokens(values: list[bytes]) -> list[bytes]:
    """The comma-separated elements of list-valued fields, lower-cased."""
    return [token.strip(b" \t").lower() for value in values for token in value.split(b",")]


_END: Final = EndOfMessage()  # immutable, so one instance serves every message without trailers


class _Http1Parser:
    """What both directions share: head finding, limits, body slicing, chunked feeding."""

    __slots__ = (
        "_after_message",
        "_chunk_tail",
        "_collector",
        "_eof",
        "_error",
        "_limits",
        "_line_end",
        "_llhttp",
        "_overhead_run",
        "_partial",
        "_remaining",
        "_state",
    )

    _error_status: int | None = None  # every error gets this status (responses: 502)
    _chunked_head: bytes  # a synthetic head that leaves llhttp reading a chunked body

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._state = _HEAD
        self._after_message = _HEAD
        # Bytes of an incomplete head, or bytes held while an upgrade is undecided.
        self._partial = bytearray()
        self._line_end = -1  # offset of the start line's CRLF in _partial, once seen
        self._remaining = 0  # Content-Length body bytes still to come
        self._chunk_tail = b""  # the last (<= 4) bytes given to llhttp in a chunked body
        self._overhead_run = 0  # chunk framing bytes since the last body byte
        self._collector = _Collector()
        self._llhttp: HttpRequestParser | HttpResponseParser | None = None
        self._error: HttpError | None = None
        self._eof = False

    # -- public ---------------------------------------------------------------------------

    def feed(self, data: bytes) -> list[Event]:
        """Consume ``data`` (bytes, never mutated later); return the events it completed.

        Body events may carry slices of ``data`` or ``data`` itself. Not a cancel point (the
        parser is synchronous).

        Raises:
            HttpError: the bytes break HTTP/1.1 or a limit (see the module docstring);
                ``events`` on it holds what this call completed before the error.
            RuntimeError: after ``feed_eof``, or after the connection became a tunnel.
        """
        self._check_usable()
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        return self._run(data, eof=False)

    def feed_eof(self) -> list[Event]:
        """The peer closed its sending side; return the events that completes.

        A body delimited by the close ends here (``EndOfMessage``). Idempotent.

        Raises:
            HttpError: the close cut a message short (a truncated head or body; a response
                still owed to an ``expect``ed request).
        """
        self._check_usable(tunnel_ok=True)
        if self._eof:
            return []
        self._eof = True
        return self._run(b"", eof=True)

    @property
    def at_rest(self) -> bool:
        """Between messages with nothing held: no partial head, no end of stream, no
        error, not a tunnel. Bytes fed from here on start a new message."""
        return (
            self._state is _HEAD and not self._partial and not self._eof and self._error is None
        )

    @property
    def body_remaining(self) -> int:
        """Bytes of a Content-Length body still to come (0 outside such a body)."""
        return self._remaining if self._state is _LENGTH else 0

    def skip_body(self, size: int) -> list[Event]:
        """Count ``size`` bytes of the Content-Length body as read, without their data
        (something else moved them); return the events that completes (the
        ``EndOfMessage`` at the body's end).

        Raises:
            RuntimeError: not inside a Content-Length body, or ``size`` is not
                1..``body_remaining``.
        """
        self._check_usable()
        if not 0 < size <= self.body_remaining:
            raise RuntimeError(
                f"cannot skip {size} body bytes with {self.body_remaining} to come"
            )
        events: list[Event] = []
        self._remaining -= size
        if not self._remaining:
            self._end_message(events)
        return events

    # -- driving --------------------------------------------------------------------------

    def _check_usable(self, *, tunnel_ok: bool = False) -> None:
        if self._error is not None:
            raise HttpError(self._error.status, self._error.reason)
        if self._state is _TUNNEL and not tunnel_ok:
            raise RuntimeError("the connection is a tunnel now; its bytes are not HTTP")

    def _run(self, data: bytes, *, eof: bool) -> list[Event]:
        events: list[Event] = []
        self._collector.events = events
        try:
            if data:
                self._consume(data, events)
            if eof:
                self._finish(events)
        except HttpError as error:
            self._error = error
            self._llhttp = None
            error.events = events
            raise
        return events

    def _bad(self, status: int, reason: str) -> HttpError:
        return HttpError(self._error_status or status, reason)

    def _consume(self, data: bytes, events: list[Event]) -> None:
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state is _HEAD:
                pos = self._consume_head(data, pos, events)
            elif state is _LENGTH:
                pos = self._consume_length(data, pos, events)
            elif state is _CHUNKED:
                pos = self._consume_chunked(data, pos, events)
            elif state is _UNTIL_CLOSE:
                self._count_body(size - pos)
                events.append(Body(data[pos:] if pos else data))
                pos = size
            elif state is _PAUSED:
                self._hold(data, pos)
                pos = size
            else:  # DONE: RFC 9112 §9.6, nothing after a closing message is processed
                pos = size

    def _finish(self, events: list[Event]) -> None:
        state = self._state
        if state is _HEAD:
            if self._partial:
                raise self._bad(400, "connection closed in the middle of a message head")
            self._check_clean_close()
            self._state = _DONE
        elif state is _LENGTH or state is _CHUNKED:
            raise self._bad(400, f"connection closed {state.value}: the body is truncated")
        elif state is _UNTIL_CLOSE:
            events.append(_END)
            self._state = _DONE

    def _check_clean_close(self) -> None:
        """Hook: the peer closed between messages (fine for a client)."""

    # -- heads ----------------------------------------------------------------------------

    def _consume_head(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Find the end of the head starting at ``pos``; parse it; return where it ended."""
        partial = self._partial
        if partial:
            tail = bytes(partial[-3:])
            found = (tail + data[:3]).find(_CRLF2)  # a CRLF CRLF straddling the feeds?
            if found >= 0:
                end = found + 4 - len(tail)
            else:
                end = data.find(_CRLF2)
                if end < 0:
                    self._extend_partial(data, pos)
                    return len(data)
                end += 4
            head = bytes(partial) + data[:end]
            partial.clear()
            self._line_end = -1
        else:
            if data[pos] in b"\r\n":  # blank lines between messages (RFC 9112 §2.2)
                match = _NOT_CRLF.search(data, pos)
                if match is None:
                    return len(data)
                pos = match.start()
            end = data.find(_CRLF2, pos)
            if end < 0:
                self._extend_partial(data, pos)
                return len(data)
            end += 4
            head = data if pos == 0 and end == len(data) else data[pos:end]
        line_end = head.find(b"\r\n")
        limits = self._limits
        if line_end > limits.max_line_bytes:
            raise self._line_too_long()
        if len(head) - line_end - 4 > limits.max_header_bytes:
            raise self._bad(431, f"header section over {limits.max_header_bytes} bytes")
        self._begin_message(head, line_end, events)
        if self._state is _TUNNEL:
            events.append(Upgraded(data[end:]))
            return len(data)
        return end

    def _extend_partial(self, data: bytes, pos: int) -> None:
        """Keep an incomplete head, within the limits (checked on what is new only)."""
        partial = self._partial
        searched = len(partial)
        partial += memoryview(data)[pos:]
        # A line break other than CRLF would keep the head from ever ending: say so now. (A
        # complete head goes to llhttp, which rejects them.) Include a CR the new bytes may pair.
        start = searched - 1 if searched and partial[searched - 1] != 10 else searched
        new = partial[start:]
        pairs = new.count(b"\r\n")
        if new.count(b"\n") != pairs or new.count(b"\r") - pairs > new.endswith(b"\r"):
            raise self._bad(400, "line break other than CRLF in a head")
        limits = self._limits
        if self._line_end < 0:
            self._line_end = partial.find(b"\r\n", max(0, searched - 1))
            if self._line_end < 0:
                if len(partial) > limits.max_line_bytes + 1:  # + its CR
                    raise self._line_too_long()
                return
            if self._line_end > limits.max_line_bytes:
                raise self._line_too_long()
        # Field bytes so far, counting at most one CR of the blank line that ends the head.
        if len(partial) - self._line_end - 2 > limits.max_header_bytes + 1:
            raise self._bad(431, f"header section over {limits.max_header_bytes} bytes")

    def _line_too_long(self) -> HttpError:
        return self._bad(414, f"request line over {self._limits.max_line_bytes} bytes")

    def _begin_message(self, head: bytes, line_end: int, events: list[Event]) -> None:
        raise NotImplementedError

    def _new_llhttp(self) -> HttpRequestParser | HttpResponseParser:
        raise NotImplementedError

    def _parse_head(self, head: bytes) -> tuple[Headers, HttpRequestParser | HttpResponseParser]:
        """Feed exactly one head to llhttp; return its fields and the llhttp that read it.

        ``self._llhttp`` keeps it unless it failed or paused; ``_start_body`` then decides.
        The target (request) or reason (response) is left in ``self._collector.target``.
        """
        collector = self._collector
        collector.reset()
        parser = self._llhttp
        if parser is None:
            parser = self._new_llhttp()
        self._llhttp = None  # until it proves usable
        try:
            parser.feed_data(head)
        except HttpParserUpgrade:
            pass  # llhttp paused after an Upgrade / CONNECT / 101 head: it is spent
        except HttpParserError as error:
            # After the head, llhttp's complaints concern framing, which is decided here.
            if collector.head_fields is None or isinstance(error.__context__, _SecondMessage):
                raise self._llhttp_error(error, head) from None
        else:
            self._llhttp = parser  # at a boundary, or inside the body it read the head of
        fields = collector.head_fields
        if fields is None or collector.body_bytes:
            raise self._bad(400, "malformed head")
        if len(fields) > self._limits.max_headers:
            raise self._bad(431, f"more than {self._limits.max_headers} header fields")
        return tuple(fields), parser

    def _llhttp_error(self, error: HttpParserError, head: bytes) -> HttpError:
        return self._bad(400, f"malformed head: {error}")

    def _content_length(self, values: list[bytes]) -> BodyKind:
        """The Content-Length framing (one field, digits only), within max_body_bytes."""
        if len(values) != 1:
            raise self._bad(400, "more than one Content-Length")
        value = values[0]
        if not value.isdigit():
            raise self._bad(400, f"invalid Content-Length {value!r}")
        length = int(value)
        limit = self._limits.max_body_bytes
        if limit is not None and length > limit:
            raise self._bad(413, f"Content-Length {length} over the limit of {limit} bytes")
        return BodyKind(Framing.CONTENT_LENGTH, length)

    # -- bodies ---------------------------------------------------------------------------

    def _start_body(self, body: BodyKind, events: list[Event]) -> None:
        """Enter the state that reads ``body`` (or end the message at once)."""
        framing = body.framing
        if framing is Framing.CONTENT_LENGTH and body.content_length:
            self._remaining = body.content_length
            self._state = _LENGTH
        elif framing is Framing.CHUNKED:
            self._state = _CHUNKED
            self._chunk_tail = b""
            self._overhead_run = 0
            if self._llhttp is None or self._collector.completed:
                # llhttp skipped this body (httptools does so for any Upgrade request).
                self._llhttp = self._primed_for_chunks()
            return
        elif framing is Framing.UNTIL_CLOSE:
            self._state = _UNTIL_CLOSE
        else:
            self._end_message(events)
        self._keep_llhttp_if_at_boundary()

    def _keep_llhttp_if_at_boundary(self) -> None:
        """Drop llhttp unless it can read the next head (it would expect a body it never sees)."""
        parser = self._llhttp
        if parser is not None and not (self._collector.completed and parser.should_keep_alive()):
            self._llhttp = None

    def _end_message(self, events: list[Event], trailers: Headers = ()) -> None:
        events.append(EndOfMessage(trailers) if trailers else _END)
        self._state = self._after_message

    def _count_body(self, size: int) -> None:
        limit = self._limits.max_body_bytes
        if limit is not None:
            self._collector.body_bytes += size
            if self._collector.body_bytes > limit:
                raise self._bad(413, f"body over the limit of {limit} bytes")

    def _consume_length(self, data: bytes, pos: int, events: list[Event]) -> int:
        take = len(data) - pos
        remaining = self._remaining
        if take >= remaining:
            take = remaining
        events.append(Body(data if pos == 0 and take == len(data) else data[pos : pos + take]))
        self._remaining = remaining - take
        if not self._remaining:
            self._end_message(events)
        return pos + take

    def _primed_for_chunks(self) -> HttpRequestParser | HttpResponseParser:
        """A fresh llhttp in the chunked-body state (its synthetic head is discarded)."""
        collector = self._collector
        parser = self._new_llhttp()
        collector.reset()
        parser.feed_data(self._chunked_head)
        return parser

    def _consume_chunked(self, data: bytes, pos: int, events: list[Event]) -> int:
        """Feed llhttp up to each place the message could end, until it does."""
        size = len(data)
        start = pos
        with memoryview(data) as view:
            while pos < size:
                end = self._next_possible_end(data, pos)
                if self._feed_chunks(view[pos:end], events):
                    return end
                pos = end
        self._chunk_tail = (self._chunk_tail + data[max(start, size - 4) :])[-4:]
        return size

    def _next_possible_end(self, data: bytes, pos: int) -> int:
        """The end of the next CRLF CRLF after ``pos`` that follows a byte other than CR / LF.

        A chunked message ends with the blank line after its last chunk (``0[;ext]``) or its
        last trailer field, so only such places can end it; ``len(data)`` if there is none.
        Runs of CR / LF are skipped whole, so body bytes can make the parser cut (and call
        llhttp) at most once per five bytes, which costs about what a tiny chunk costs anyway.
        """
        tail = self._chunk_tail
        if pos == 0 and tail:  # one that straddles the previous feed and this one
            joined = tail + data[:3]
            found = joined.find(_CRLF2, max(len(tail) - 3, 0))
            while found >= 0:
                if found and joined[found - 1] not in b"\r\n":
                    return found + 4 - len(tail)
                found = joined.find(_CRLF2, found + 1)
        found = data.find(_CRLF2, max(pos - 3, 0))
        while found >= 0:
            before = data[found - 1] if found else (tail[-1] if tail else 0)
            if before not in b"\r\n":
                return found + 4
            run = _NOT_CRLF.search(data, found)
            if run is None:
                break
            found = data.find(_CRLF2, run.start())
        return len(data)

    def _feed_chunks(self, piece: memoryview, events: list[Event]) -> bool:
        """Give ``piece`` of a chunked body to llhttp; True once the message is complete."""
        collector = self._collector
        parser = self._llhttp
        assert parser is not None
        before = collector.body_bytes
        try:
            parser.feed_data(piece)
        except HttpParserError as error:
            raise self._bad(400, f"invalid chunked body: {error}") from None
        limits = self._limits
        if collector.body_bytes != before:
            self._overhead_run = 0
            if limits.max_body_bytes is not None and collector.body_bytes > limits.max_body_bytes:
                raise self._bad(413, f"body over the limit of {limits.max_body_bytes} bytes")
        else:
            self._overhead_run += len(piece)
        if self._overhead_run > limits.max_header_bytes:
            raise self._bad(431, f"chunk framing or trailers over {limits.max_header_bytes} bytes")
        if not collector.completed:
            return False
        trailers = tuple(collector.fields)
        if len(trailers) > limits.max_headers:
            raise self._bad(431, f"more than {limits.max_headers} trailer fields")
        if sum(len(name) + len(value) + 4 for name, value in trailers) > limits.max_header_bytes:
            raise self._bad(431, f"trailer section over {limits.max_header_bytes} bytes")
        if not parser.should_keep_alive():
            self._llhttp = None
        self._chunk_tail = b""
        self._end_message(events, trailers)
        return True

    def _hold(self, data: bytes, pos: int) -> None:
        self._partial += memoryview(data)[pos:]
        if len(self._partial) > self._limits.max_header_bytes:
            limit = self._limits.max_header_bytes
            raise self._bad(400, f"over {limit} bytes sent before the upgrade was answered")


class RequestParser(_Http1Parser):
    """The requests a downstream client sends, as events (server side of a connection).

    Pipelined requests come out in order. After a request that may switch protocols
    (``RequestHead.may_switch_protocols``: Upgrade or CONNECT) and its EndOfMessage, later bytes
    are held unread until the proxy calls ``accept_upgrade`` or ``decline_upgrade``.
    """

    __slots__ = ("_keep_alive",)
    _chunked_head = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._keep_alive = True

    @property
    def is_awaiting_upgrade(self) -> bool:
        """An Upgrade / CONNECT request is complete and its answer is not known yet."""
        return self._state is _PAUSED

    def accept_upgrade(self) -> Upgraded:
        """The upstream switched protocols (101, or 2xx to CONNECT): the rest is a tunnel.

        Returns:
            ``Upgraded`` with the bytes received since the request, which belong to the tunnel.

        Raises:
            RuntimeError: no request is awaiting an upgrade decision.
        """
        self._check_usable()
        if self._state is not _PAUSED:
            raise RuntimeError("no Upgrade or CONNECT request is awaiting an answer")
        held = bytes(self._partial)
        self._partial.clear()
        self._state = _TUNNEL
        return Upgraded(held)

    def decline_upgrade(self) -> list[Event]:
        """The upstream answered without switching: parse what was held as HTTP again.

        Returns:
            The events completed by the held bytes (and by an end of input seen meanwhile).

        Raises:
            HttpError: as ``feed``.
            RuntimeError: no request is awaiting an upgrade decision.
        """
        self._check_usable()
        if self._state is not _PAUSED:
            raise RuntimeError("no Upgrade or CONNECT request is awaiting an answer")
        held = bytes(self._partial)
        self._partial.clear()
        self._state = _HEAD if self._keep_alive else _DONE
        return self._run(held, eof=self._eof)

    def _new_llhttp(self) -> HttpRequestParser:
        return HttpRequestParser(self._collector)

    def _llhttp_error(self, error: HttpParserError, head: bytes) -> HttpError:
        if isinstance(error, HttpParserInvalidMethodError):
            method = head.partition(b" ")[0]
            if _TOKEN.fullmatch(method):
                return HttpError(501, f"method {method.decode('latin-1')!r} is not implemented")
        return HttpError(400, f"malformed request: {error}")

    def _begin_message(self, head: bytes, line_end: int, events: list[Event]) -> None:
        version_field = head[max(line_end - 9, 0) : line_end]
        if version_field == b" HTTP/1.1":
            version = b"1.1"
        elif version_field == b" HTTP/1.0":
            version = b"1.0"
        elif version_field[:1] == b" " and _VERSION.fullmatch(version_field, 1):
            raise HttpError(505, f"HTTP version {version_field[6:].decode()} is not supported")
        else:
            raise HttpError(400, "malformed request line")
        headers, parser = self._parse_head(head)
        assert isinstance(parser, HttpRequestParser)
        method = parser.get_method()
        framing = _group(self._collector.framing_fields)
        http11 = version == b"1.1"
        hosts = len(framing.get(b"host", ()))
        if hosts != 1 and (http11 or hosts):
            raise HttpError(400, "more than one Host" if hosts else "missing Host")
        content_length = framing.get(b"content-length")
        transfer_encoding = framing.get(b"transfer-encoding")
        if transfer_encoding:
            if not http11:
                raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if content_length:
                raise HttpError(400, "both Content-Length and Transfer-Encoding")
            codings = _tokens(transfer_encoding)
            if codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
                raise HttpError(400, "Transfer-Encoding does not end with a single chunked")
            if len(codings) != 1:
                raise HttpError(501, "transfer codings other than chunked are not implemented")
            body = CHUNKED_BODY
        elif content_length:
            body = self._content_length(content_length)
        else:
            body = NO_BODY
        if method == b"CONNECT" and body.framing is not Framing.NONE and body.content_length != 0:
            raise HttpError(400, "CONNECT request with a body")
        upgrade = None
        connection = framing.get(b"connection")
        if connection:
            tokens = _tokens(connection)
            keep_alive = b"close" not in tokens if http11 else b"keep-alive" in tokens
            if http11 and b"upgrade" in tokens and b"upgrade" in framing:
                upgrade = b", ".join(framing[b"upgrade"])
        else:
            keep_alive = http11
        expect = framing.get(b"expect")
        expect_continue = http11 and expect is not None and b"100-continue" in _tokens(expect)
        request = _new_request_head(
            method,
            self._collector.target,
            version,
            headers,
            keep_alive,
            upgrade,
            expect_continue,
            body,
        )
        events.append(request)
        self._keep_alive = keep_alive
        if request.may_switch_protocols:
            self._after_message = _PAUSED
        else:
            self._after_message = _HEAD if keep_alive else _DONE
        self._start_body(body, events)


class ResponseParser(_Http1Parser):
    """The responses an upstream sends, as events (client side of a connection).

    Call ``expect(method)`` for every request sent, in order, before its response can arrive:
    the method decides the framing (HEAD, CONNECT). Informational responses (1xx but 101) come
    out as a lone ``ResponseHead`` before the final one.
    """

    __slots__ = ("_pending",)
    _error_status = 502
    _chunked_head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits)
        self._pending: deque[tuple[bytes, bool]] = deque()

    def expect(self, method: bytes, *, upgrade: bool = False) -> None:
        """A request with ``method`` was sent; its response comes after those expected before.

        Args:
            method: the request's method (``RequestHead.method``).
            upgrade: the request asked to switch protocols (``RequestHead.upgrade`` set): only
                then is a 101 response accepted.
        """
        self._pending.append((method, upgrade))

    @property
    def pending(self) -> int:
        """Requests expected whose final response has not begun."""
        return len(self._pending)

    def _new_llhttp(self) -> HttpResponseParser:
        return HttpResponseParser(self._collector)

    def _line_too_long(self) -> HttpError:
        return HttpError(502, f"status line over {self._limits.max_line_bytes} bytes")

    def _llhttp_error(self, error: HttpParserError, head: bytes) -> HttpError:
        return HttpError(502, f"malformed response: {error}")

    def _check_clean_close(self) -> None:
        if self._pending:
            raise HttpError(502, "connection closed before the response")

    def _begin_message(self, head: bytes, line_end: int, events: list[Event]) -> None:
        if not self._pending:
            raise HttpError(502, "response without a request")
        version_field = head[:9]
        if version_field == b"HTTP/1.1 ":
            version = b"1.1"
        elif version_field == b"HTTP/1.0 ":
            version = b"1.0"
        else:
            raise HttpError(502, "malformed status line or HTTP version other than 1.0 / 1.1")
        headers, parser = self._parse_head(head)
        assert isinstance(parser, HttpResponseParser)
        status = parser.get_status_code()
        if status < 100:
            raise HttpError(502, f"invalid status {status}")
        reason = self._collector.target
        framing = _group(self._collector.framing_fields)
        connection = framing.get(b"connection")
        if connection:
            tokens = _tokens(connection)
            keep_alive = b"close" not in tokens if version == b"1.1" else b"keep-alive" in tokens
        else:
            keep_alive = version == b"1.1"
        method, upgrade_asked = self._pending[0]
        if status < 200 and status != 101:
            events.append(_new_response_head(status, reason, version, headers, keep_alive, NO_BODY))
            self._keep_llhttp_if_at_boundary()
            return
        self._pending.popleft()
        if status == 101 or (method == b"CONNECT" and status < 300):
            if status == 101 and not upgrade_asked:
                raise HttpError(502, "101 Switching Protocols to a request that did not ask")
            events.append(_new_response_head(status, reason, version, headers, False, NO_BODY))
            self._state = _TUNNEL
            self._llhttp = None
            return
        if method == b"HEAD" or status == 204 or status == 304:
            body = NO_BODY
        elif b"transfer-encoding" in framing:
            if b"content-length" in framing:
                raise HttpError(502, "both Content-Length and Transfer-Encoding")
            if _tokens(framing[b"transfer-encoding"]) != [b"chunked"]:
                raise HttpError(502, "transfer coding other than chunked")
            body = CHUNKED_BODY
        elif b"content-length" in framing:
            body = self._content_length(framing[b"content-length"])
        else:
            body = UNTIL_CLOSE_BODY
            keep_alive = False
        events.append(_new_response_head(status, reason, version, headers, keep_alive, body))
        self._after_message = _HEAD if keep_alive else _DONE
        self._start_body(body, events)
