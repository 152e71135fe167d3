"""HTTP/1.1 framing: tables of wire cases, every split of the wire, and generated messages."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshagent.protocol.headers import Headers
from meshagent.protocol.http1 import (
    CHUNKED_BODY,
    LAST_CHUNK,
    NO_BODY,
    UNTIL_CLOSE_BODY,
    Body,
    BodyKind,
    EndOfMessage,
    Event,
    Framing,
    HttpError,
    Limits,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    Upgraded,
    error_response,
    serialize_chunk,
    serialize_last_chunk,
    serialize_request_head,
    serialize_response_head,
)

# --------------------------------------------------------------------------- helpers


def merged(events: Iterable[Event]) -> list[Event]:
    """Adjacent Body events joined: how a body is cut into pieces depends on the feeds."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def feed_all(
    parser: RequestParser | ResponseParser, chunks: Iterable[bytes], *, eof: bool = False
) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    if eof:
        events += parser.feed_eof()
    return merged(events)


def requests(wire: bytes | Sequence[bytes], limits: Limits | None = None) -> list[Event]:
    chunks = [wire] if isinstance(wire, bytes) else wire
    return feed_all(RequestParser(limits or Limits()), chunks)


def responses(
    wire: bytes | Sequence[bytes],
    methods: Sequence[bytes] = (b"GET",),
    *,
    eof: bool = False,
    limits: Limits | None = None,
) -> list[Event]:
    parser = ResponseParser(limits or Limits())
    for method in methods:
        parser.expect(method)
    chunks = [wire] if isinstance(wire, bytes) else wire
    return feed_all(parser, chunks, eof=eof)


def splits_of(wire: bytes) -> Iterable[list[bytes]]:
    """The wire whole, one byte at a time, and cut in two at every offset."""
    yield [wire]
    yield [wire[i : i + 1] for i in range(len(wire))]
    for cut in range(1, len(wire)):
        yield [wire[:cut], wire[cut:]]


def error_of(parser: RequestParser | ResponseParser, chunks: Iterable[bytes], eof: bool) -> int:
    with pytest.raises(HttpError) as caught:
        feed_all(parser, chunks, eof=eof)
    return caught.value.status


END = EndOfMessage()
GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def get_head(target: bytes = b"/", **changes: object) -> RequestHead:
    fields: dict[str, object] = {"method": b"GET", "target": target, "headers": ((b"Host", b"a"),)}
    fields.update(changes)
    return RequestHead(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- requests


def test_simple_get() -> None:
    assert requests(b"GET /x?y=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n") == [
        RequestHead(
            b"GET",
            b"/x?y=1",
            b"1.1",
            ((b"Host", b"a"), (b"Accept", b"*/*")),
            keep_alive=True,
            upgrade=None,
            expect_continue=False,
            body=NO_BODY,
        ),
        END,
    ]


PIPELINE = (
    b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
    b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1;x\r\nabc\r\n6\r\n\r\n\r\n\r\n\r\n0\r\nChecksum: 42\r\nX-Done:   yes  \r\n\r\n"
    b"DELETE /4 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"
)
PIPELINE_EVENTS: list[Event] = [
    get_head(b"/1"),
    END,
    RequestHead(
        b"POST",
        b"/2",
        headers=((b"Host", b"a"), (b"Content-Length", b"5")),
        body=BodyKind(Framing.CONTENT_LENGTH, 5),
    ),
    Body(b"hello"),
    END,
    RequestHead(
        b"PUT",
        b"/3",
        headers=((b"Host", b"a"), (b"Transfer-Encoding", b"chunked")),
        body=CHUNKED_BODY,
    ),
    Body(b"abc\r\n\r\n\r\n"),
    EndOfMessage(((b"Checksum", b"42"), (b"X-Done", b"yes"))),
    RequestHead(
        b"DELETE",
        b"/4",
        headers=((b"Host", b"a"), (b"Content-Length", b"0")),
        body=BodyKind(Framing.CONTENT_LENGTH, 0),
    ),
    END,
]


def test_pipelined_requests_in_one_feed_come_out_in_order() -> None:
    assert requests(PIPELINE) == PIPELINE_EVENTS


def test_every_split_of_a_pipeline_gives_the_same_events() -> None:
    for chunks in splits_of(PIPELINE):
        assert requests(chunks) == PIPELINE_EVENTS, [len(c) for c in chunks]


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(PIPELINE)), max_size=25))
def test_random_splits_of_a_pipeline_give_the_same_events(cuts: list[int]) -> None:
    points = sorted({0, len(PIPELINE), *cuts})
    chunks = [PIPELINE[a:b] for a, b in itertools.pairwise(points)]
    assert requests(chunks) == PIPELINE_EVENTS


def test_content_length_body_is_not_copied() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    data = b"0123456789"
    [body, end] = parser.feed(data)
    assert isinstance(body, Body) and body.data is data
    assert end == END


def test_skip_body_counts_bytes_moved_elsewhere_and_the_next_message_parses() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    parser.expect(b"GET")
    [head, body] = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123")
    assert isinstance(head, ResponseHead) and body == Body(b"0123")
    assert parser.body_remaining == 96
    assert parser.skip_body(90) == []  # in pieces
    assert parser.body_remaining == 6
    assert parser.skip_body(6) == [END]
    assert parser.body_remaining == 0
    with pytest.raises(RuntimeError, match="cannot skip 1 body bytes with 0 to come"):
        parser.skip_body(1)
    [second, end] = parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert isinstance(second, ResponseHead) and second.status == 204 and end == END


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
        b"HTTP/1.1 200 OK\r\n\r\nuntil close",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",  # head not complete
    ],
)
def test_skip_body_is_refused_outside_a_content_length_body(wire: bytes) -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    parser.feed(wire)
    assert parser.body_remaining == 0
    with pytest.raises(RuntimeError, match="cannot skip 5 body bytes with 0 to come"):
        parser.skip_body(5)


def test_skip_body_never_skips_more_than_is_left() -> None:
    parser = RequestParser()
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
    for bad in (0, -1, 11):
        with pytest.raises(RuntimeError, match=f"cannot skip {bad} body bytes with 10 to come"):
            parser.skip_body(bad)
    assert parser.feed(b"0123456789") == [Body(b"0123456789"), END]


def test_blank_lines_between_requests_are_ignored() -> None:
    assert requests(b"\r\n\r\n" + GET + b"\r\n" + GET) == [get_head(), END, get_head(), END]
    assert requests([b"\r\n", b"\r\n", GET]) == [get_head(), END]


def test_values_lose_surrounding_whitespace_names_keep_their_case() -> None:
    [head, _] = requests(b"GET / HTTP/1.1\r\nhOsT:  a \t\r\nX-Empty:\r\nX-Sp: a b  \r\n\r\n")
    assert isinstance(head, RequestHead)
    assert head.headers == ((b"hOsT", b"a"), (b"X-Empty", b""), (b"X-Sp", b"a b"))


@pytest.mark.parametrize(
    ("wire", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, Close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nHost: a\r\nConnection: Keep-Alive\r\n\r\n", True),
    ],
)
def test_keep_alive(wire: bytes, keep_alive: bool) -> None:
    [head, _] = requests(wire)
    assert isinstance(head, RequestHead) and head.keep_alive is keep_alive


def test_nothing_after_a_closing_request_is_processed() -> None:
    close = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    parser = RequestParser()
    assert len(parser.feed(close + GET)) == 2
    assert parser.feed(b"garbage that would be a 400") == []
    assert parser.feed_eof() == []


def test_expect_continue() -> None:
    wire = b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n"
    parser = RequestParser()
    [head] = parser.feed(wire)
    assert isinstance(head, RequestHead) and head.expect_continue
    assert parser.feed(b"ok") == [Body(b"ok"), END]
    [head, _] = requests(b"GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n")
    assert isinstance(head, RequestHead) and not head.expect_continue  # ignored in 1.0


# -- protocol switches


WEBSOCKET = b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n"


def test_upgrade_request_holds_later_bytes_until_accepted() -> None:
    for chunks in splits_of(WEBSOCKET + b"\x81\x05hello"):
        parser = RequestParser()
        events = feed_all(parser, chunks)
        assert [type(e) for e in events] == [RequestHead, EndOfMessage]
        head = events[0]
        assert isinstance(head, RequestHead) and head.upgrade == b"websocket"
        assert head.may_switch_protocols and parser.is_awaiting_upgrade
        assert parser.accept_upgrade() == Upgraded(b"\x81\x05hello")
        with pytest.raises(RuntimeError):
            parser.feed(b"more")


def awaiting_upgrade(parser: RequestParser) -> bool:
    return parser.is_awaiting_upgrade  # a call, so mypy does not keep an earlier narrowing


def test_declined_upgrade_resumes_http() -> None:
    parser = RequestParser()
    events = parser.feed(WEBSOCKET + GET)
    assert len(events) == 2 and parser.is_awaiting_upgrade
    assert parser.decline_upgrade() == [get_head(), END]
    assert not awaiting_upgrade(parser)
    assert parser.feed(GET) == [get_head(), END]
    with pytest.raises(RuntimeError):
        parser.accept_upgrade()


def test_declined_upgrade_after_eof_reports_the_truncation() -> None:
    parser = RequestParser()
    parser.feed(WEBSOCKET + GET[:10])
    assert parser.feed_eof() == []
    with pytest.raises(HttpError) as caught:
        parser.decline_upgrade()
    assert caught.value.status == 400


def test_upgrade_is_ignored_without_connection_upgrade_or_in_http_1_0() -> None:
    for wire in (
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.0\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ):
        parser = RequestParser()
        [head, _] = parser.feed(wire)
        assert isinstance(head, RequestHead) and head.upgrade is None
        assert not parser.is_awaiting_upgrade


def test_upgrade_request_with_bodies() -> None:
    # httptools makes llhttp skip the body of any Upgrade request: the parser reads it itself.
    sized = (
        b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAA\r\nContent-Length: 4\r\n\r\nbodyTUNNEL"
    )
    chunked = (
        b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\nTUNNEL"
    )
    for wire in (sized, chunked):
        for chunks in splits_of(wire):
            parser = RequestParser()
            events = feed_all(parser, chunks)
            assert events[1:] == [Body(b"body"), END]
            assert parser.accept_upgrade() == Upgraded(b"TUNNEL")


def test_connect_request() -> None:
    wire = b"CONNECT db.mesh:5432 HTTP/1.1\r\nHost: db.mesh:5432\r\n\r\n\x00\x01raw"
    for chunks in splits_of(wire):
        parser = RequestParser()
        events = feed_all(parser, chunks)
        assert events == [
            RequestHead(b"CONNECT", b"db.mesh:5432", headers=((b"Host", b"db.mesh:5432"),)),
            END,
        ]
        head = events[0]
        assert isinstance(head, RequestHead) and head.may_switch_protocols
        assert parser.accept_upgrade() == Upgraded(b"\x00\x01raw")


def test_bytes_held_for_an_upgrade_decision_are_bounded() -> None:
    parser = RequestParser(Limits(max_header_bytes=100))
    parser.feed(WEBSOCKET + b"x" * 100)
    with pytest.raises(HttpError) as caught:
        parser.feed(b"x")
    assert caught.value.status == 400


# -- errors


def status_of(wire: bytes, limits: Limits | None = None, *, eof: bool = False) -> int:
    """The status of the HttpError the wire raises, the same for every split."""
    statuses = {
        error_of(RequestParser(limits or Limits()), chunks, eof) for chunks in splits_of(wire)
    }
    assert len(statuses) == 1, statuses
    return statuses.pop()


# fmt: off
SMUGGLING = [
    # framing that two parsers could read differently
    ("CL and TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("TE and CL", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"),
    ("two different CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
    ("two equal CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"),
    ("CL list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n"),
    ("CL sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n"),
    ("CL negative", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
    ("CL hex", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n"),
    ("CL empty", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n"),
    ("CL overflow", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
    ("TE chunked not last", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
    ("TE chunked twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"),
    ("TE only gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("TE in two fields", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("TE with a space before the colon", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n"),
    ("obs-fold of TE", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"),
    ("bare LF line end", b"GET / HTTP/1.1\nHost: a\n\n"),
    ("bare LF in a field", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n"),
    ("bare CR", b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n"),
    ("bad chunk size", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("chunk size with a space", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n"),
    ("chunk size overflow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\n"),
    ("chunk data too long", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n"),
    ("chunk without CRLF", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc0\r\n\r\n"),
    ("last chunk with LF only", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\n\n"),
    ("missing Host", b"GET / HTTP/1.1\r\n\r\n"),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("two Hosts in HTTP/1.0", b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n"),
    ("CONNECT with a body", b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\nContent-Length: 2\r\n\r\nhi"),
    ("space in a field name", b"GET / HTTP/1.1\r\nHost: a\r\nX Y: z\r\n\r\n"),
    ("no colon", b"GET / HTTP/1.1\r\nHost: a\r\nX-Y\r\n\r\n"),
    ("NUL in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n"),
    ("space in the target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("HTTP/0.9 request", b"GET /\r\n\r\n"),
    ("lower-case version", b"GET / http/1.1\r\nHost: a\r\n\r\n"),
    ("TLS client hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"),
    ("binary garbage", bytes(range(256)) + b"\r\n\r\n"),
]
# fmt: on


@pytest.mark.parametrize(("name", "wire"), SMUGGLING, ids=[name for name, _ in SMUGGLING])
def test_ambiguous_or_malformed_requests_are_400(name: str, wire: bytes) -> None:
    assert status_of(wire) == 400


@pytest.mark.parametrize(
    ("wire", "status"),
    [
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
        (b"FROB / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
        (b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    ],
)
def test_unsupported_versions_methods_and_codings(wire: bytes, status: int) -> None:
    assert status_of(wire) == status


# fmt: off
LIMIT_CASES: list[tuple[bytes, Limits, int | None]] = [
    # header section (field lines, CRLFs included, blank line excluded): 100 bytes is fine
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 86 + b"\r\n\r\n", Limits(max_header_bytes=100), None),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 87 + b"\r\n\r\n", Limits(max_header_bytes=100), 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"x" * 500, Limits(max_header_bytes=100), 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 3 + b"\r\n", Limits(max_headers=4), None),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 4 + b"\r\n", Limits(max_headers=4), 431),
    # request line without its CRLF: 30 bytes is fine
    (b"GET /" + b"a" * 16 + b" HTTP/1.1\r\nHost: a\r\n\r\n", Limits(max_line_bytes=30), None),
    (b"GET /" + b"a" * 17 + b" HTTP/1.1\r\nHost: a\r\n\r\n", Limits(max_line_bytes=30), 414),
    (b"GET /" + b"a" * 100, Limits(max_line_bytes=30), 414),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n" + b"x" * 10, Limits(max_body_bytes=10), None),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", Limits(max_body_bytes=10), 413),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n5\r\n12345\r\n0\r\n\r\n", Limits(max_body_bytes=10), None),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n6\r\n123456\r\n", Limits(max_body_bytes=10), 413),
    # trailers and chunk framing count against max_header_bytes / max_headers
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nT: " + b"x" * 200 + b"\r\n\r\n", Limits(max_header_bytes=100), 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n" + b"T: 1\r\n" * 5 + b"\r\n", Limits(max_headers=4), 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;" + b"e" * 300, Limits(max_header_bytes=100), 431),
]
# fmt: on


@pytest.mark.parametrize(("wire", "limits", "status"), LIMIT_CASES)
def test_limits(wire: bytes, limits: Limits, status: int | None) -> None:
    if status is None:
        for chunks in splits_of(wire):
            assert requests(chunks, limits)[-1] == END
    else:
        assert status_of(wire, limits) == status


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_headers"):
        Limits(max_headers=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        Limits(max_body_bytes=-1)


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nshort",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
    ],
)
def test_a_close_inside_a_request_is_400(wire: bytes) -> None:
    assert status_of(wire, eof=True) == 400


def test_a_close_between_requests_is_clean() -> None:
    parser = RequestParser()
    assert feed_all(parser, [GET, b"\r\n"], eof=True) == [get_head(), END]
    assert parser.feed_eof() == []
    with pytest.raises(RuntimeError):
        parser.feed(GET)


def test_an_error_after_a_complete_request_carries_its_events_then_sticks() -> None:
    parser = RequestParser()
    with pytest.raises(HttpError) as caught:
        parser.feed(GET + b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert caught.value.events == [get_head(), END]
    assert (caught.value.status, str(caught.value)) == (400, "400 more than one Host")
    with pytest.raises(HttpError) as again:
        parser.feed(GET)
    assert again.value.status == 400 and again.value.events == []
    with pytest.raises(HttpError):
        parser.feed_eof()


# --------------------------------------------------------------------------- responses


def ok(
    body: BodyKind = NO_BODY, *headers: tuple[bytes, bytes], keep_alive: bool = True
) -> ResponseHead:
    return ResponseHead(200, b"OK", b"1.1", headers, keep_alive, body)


def test_head_response_has_no_body_whatever_its_framing_says() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    )
    expected = [
        ok(NO_BODY, (b"Content-Length", b"10")),
        END,
        ok(NO_BODY, (b"Transfer-Encoding", b"chunked")),
        END,
        ok(BodyKind(Framing.CONTENT_LENGTH, 2), (b"Content-Length", b"2")),
        Body(b"hi"),
        END,
    ]
    for chunks in splits_of(wire):
        assert responses(chunks, [b"HEAD", b"HEAD", b"GET"]) == expected


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_have_no_body(status: int) -> None:
    wire = (
        b"HTTP/1.1 %d X\r\nContent-Length: 5\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        % status
    )
    events = responses(wire, [b"GET", b"GET"])
    assert events == [
        ResponseHead(status, b"X", b"1.1", ((b"Content-Length", b"5"),), True, NO_BODY),
        END,
        ok(BodyKind(Framing.CONTENT_LENGTH, 0), (b"Content-Length", b"0")),
        END,
    ]


def test_informational_responses_come_before_the_final_one() -> None:
    wire = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 199 Whatever\r\nContent-Length: 3\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    expected = [
        ResponseHead(100, b"Continue"),
        ResponseHead(103, b"Early Hints", headers=((b"Link", b"</s.css>; rel=preload"),)),
        ResponseHead(199, b"Whatever", headers=((b"Content-Length", b"3"),)),
        ok(BodyKind(Framing.CONTENT_LENGTH, 2), (b"Content-Length", b"2")),
        Body(b"ok"),
        END,
    ]
    for chunks in splits_of(wire):
        parser = ResponseParser()
        parser.expect(b"PUT")
        assert feed_all(parser, chunks) == expected
        assert parser.pending == 0
    assert ResponseHead(100).is_informational and not ok().is_informational


def test_101_switches_to_a_tunnel_with_the_leftover_bytes() -> None:
    wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi"
    head = ResponseHead(
        101,
        b"Switching Protocols",
        headers=((b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")),
        keep_alive=False,
    )
    head_size = wire.index(b"\r\n\r\n") + 4
    for chunks in splits_of(wire):
        parser = ResponseParser()
        parser.expect(b"GET", upgrade=True)
        events: list[Event] = []
        fed = 0
        for chunk in chunks:
            events += parser.feed(chunk)
            fed += len(chunk)
            if events and isinstance(events[-1], Upgraded):
                break  # the shell stops feeding: later bytes are the tunnel's
        assert events == [head, Upgraded(wire[head_size:fed])]
        with pytest.raises(RuntimeError):
            parser.feed(b"x")
        assert parser.feed_eof() == []


def test_101_to_a_request_that_did_not_ask_is_502() -> None:
    wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    with pytest.raises(HttpError) as caught:
        responses(wire, [b"GET"])
    assert caught.value.status == 502


def test_2xx_to_connect_is_a_tunnel_other_answers_are_messages() -> None:
    events = responses(
        b"HTTP/1.1 200 Connection established\r\nContent-Length: 9\r\n\r\nraw", [b"CONNECT"]
    )
    assert events[1:] == [Upgraded(b"raw")]
    refused = b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 2\r\n\r\nno"
    assert responses(refused, [b"CONNECT"])[1:] == [Body(b"no"), END]


def test_until_close_body_ends_at_eof() -> None:
    wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of this\r\n\r\nis body"
    for chunks in splits_of(wire):
        assert responses(chunks, eof=True) == [
            ok(UNTIL_CLOSE_BODY, (b"Content-Type", b"text/plain"), keep_alive=False),
            Body(b"all of this\r\n\r\nis body"),
            END,
        ]
    assert responses(b"HTTP/1.0 200 OK\r\n\r\n", eof=True)[1:] == [END]


def test_chunked_response_with_trailers_then_keep_alive() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'a\r\n0123456789\r\n1;name="quoted; value"\r\nX\r\n0\r\nServer-Timing: db;dur=53\r\n\r\n'
        b"HTTP/1.1 204 No Content\r\n\r\n"
    )
    expected = [
        ok(CHUNKED_BODY, (b"Transfer-Encoding", b"chunked")),
        Body(b"0123456789X"),
        EndOfMessage(((b"Server-Timing", b"db;dur=53"),)),
        ResponseHead(204, b"No Content"),
        END,
    ]
    for chunks in splits_of(wire):
        assert responses(chunks, [b"GET", b"GET"]) == expected


def test_closing_response_drops_what_follows() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
    )
    events = responses(wire, [b"GET", b"GET"], eof=True)
    assert events == [
        ok(
            BodyKind(Framing.CONTENT_LENGTH, 0),
            (b"Connection", b"close"),
            (b"Content-Length", b"0"),
            keep_alive=False,
        ),
        END,
    ]


# fmt: off
RESPONSE_ERRORS = [
    ("garbage", b"\x00\x01\x02 not http at all\r\n\r\n", False, Limits()),
    ("HTTP/2", b"HTTP/2 200\r\n\r\n", False, Limits()),
    ("HTTP/1.2", b"HTTP/1.2 200 OK\r\n\r\n", False, Limits()),
    ("bad status", b"HTTP/1.1 2000 OK\r\n\r\n", False, Limits()),
    ("status under 100", b"HTTP/1.1 099 Odd\r\n\r\n", False, Limits()),
    ("CL and TE", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", False, Limits()),
    ("two CL", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", False, Limits()),
    ("TE not chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", False, Limits()),
    ("bad chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n", False, Limits()),
    ("truncated head", b"HTTP/1.1 200 OK\r\n", True, Limits()),
    ("truncated body", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", True, Limits()),
    ("no response at all", b"", True, Limits()),
    ("long status line", b"HTTP/1.1 200 " + b"O" * 40 + b"\r\n\r\n", False, Limits(max_line_bytes=30)),
    ("long header section", b"HTTP/1.1 200 OK\r\nX: " + b"x" * 200 + b"\r\n\r\n", False, Limits(max_header_bytes=100)),
    ("large body", b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n", False, Limits(max_body_bytes=10)),
    ("large until-close body", b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11, False, Limits(max_body_bytes=10)),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "wire", "eof", "limits"), RESPONSE_ERRORS, ids=[case[0] for case in RESPONSE_ERRORS]
)
def test_a_broken_response_is_502(name: str, wire: bytes, eof: bool, limits: Limits) -> None:
    statuses = set()
    for chunks in splits_of(wire) if wire else [[]]:
        parser = ResponseParser(limits)
        parser.expect(b"GET")
        statuses.add(error_of(parser, chunks, eof))
    assert statuses == {502}


def test_a_response_without_a_request_is_502() -> None:
    with pytest.raises(HttpError) as caught:
        responses(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", [])
    assert caught.value.status == 502
    assert responses(b"", [], eof=True) == []  # an idle upstream may close


# --------------------------------------------------------------------------- serialisers


def test_request_head_round_trip() -> None:
    head = RequestHead(
        b"POST",
        b"/api?q=1",
        headers=((b"Host", b"svc"), (b"Content-Length", b"3"), (b"X-Trace", b"a b")),
        body=BodyKind(Framing.CONTENT_LENGTH, 3),
    )
    wire = serialize_request_head(head)
    assert (
        wire == b"POST /api?q=1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nX-Trace: a b\r\n\r\n"
    )
    assert requests(wire + b"abc") == [head, Body(b"abc"), END]


def test_request_head_with_replaced_headers_and_chunks_round_trip() -> None:
    head = get_head(b"/up", method=b"PUT")
    fields: Headers = ((b"Host", b"b"), (b"Transfer-Encoding", b"chunked"))
    wire = (
        serialize_request_head(head, headers=fields)
        + serialize_chunk(b"hello ")
        + serialize_chunk(b"")
        + serialize_chunk(b"x" * 300)
        + serialize_last_chunk(((b"Digest", b"sha-256=abc"),))
    )
    assert requests(wire) == [
        RequestHead(b"PUT", b"/up", headers=fields, body=CHUNKED_BODY),
        Body(b"hello " + b"x" * 300),
        EndOfMessage(((b"Digest", b"sha-256=abc"),)),
    ]
    assert serialize_last_chunk() == LAST_CHUNK == b"0\r\n\r\n"
    assert serialize_chunk(b"") == b""


def test_response_head_round_trip() -> None:
    head = ResponseHead(
        404, b"", b"1.0", ((b"Content-Length", b"0"),), False, BodyKind(Framing.CONTENT_LENGTH, 0)
    )
    wire = serialize_response_head(head)
    assert wire == b"HTTP/1.0 404 \r\nContent-Length: 0\r\n\r\n"
    assert responses(wire) == [head, END]


@pytest.mark.parametrize(
    "fields",
    [
        ((b"X", b"a\r\nInjected: yes"),),
        ((b"X\r\nY", b"v"),),
        ((b"X", b"a\nb"),),
        ((b"X", b"a\rb"),),
    ],
)
def test_serialisers_refuse_line_breaks_in_fields(fields: Headers) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_request_head(get_head(), headers=fields)
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_response_head(ok(), headers=fields)
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_last_chunk(fields)
    with pytest.raises(ValueError, match="CR or LF"):
        serialize_request_head(get_head(b"/a\r\nX: y"))


def test_error_response() -> None:
    wire = error_response(431, "header section over 65536 bytes")
    assert wire == (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 32\r\nConnection: close\r\n\r\nheader section over 65536 bytes\n"
    )
    [head, body, end] = responses(wire)
    assert isinstance(head, ResponseHead) and (head.status, head.keep_alive) == (431, False)
    assert (body, end) == (Body(b"header section over 65536 bytes\n"), END)
    [head, *_] = responses(error_response(503, "d\u00e9j\u00e0 vu\n", close=False))
    assert isinstance(head, ResponseHead) and head.keep_alive
    assert head.headers[1] == (b"Content-Length", b"10")
    for status in (100, 204, 304, 600):
        with pytest.raises(ValueError):
            error_response(status, "x")


# --------------------------------------------------------------------------- generated


TOKEN = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~!#$%&'*+^`|",
    min_size=1,
    max_size=12,
)
VALUE = st.text("".join(chr(c) for c in range(0x21, 0x7F)) + " \t", max_size=20).map(str.strip)
RESERVED = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "expect",
    "te",
    "trailer",
}
FIELDS = st.lists(
    st.tuples(TOKEN.filter(lambda name: name.lower() not in RESERVED), VALUE).map(
        lambda field: (field[0].encode(), field[1].encode())
    ),
    max_size=6,
)


@st.composite
def request_wires(draw: st.DrawFn) -> tuple[bytes, list[Event]]:
    """A pipeline of one to three generated requests and the events it must produce."""
    wire = b""
    expected: list[Event] = []
    for _ in range(draw(st.integers(1, 3))):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"]))
        target = b"/" + draw(TOKEN).encode()
        fields: Headers = ((b"Host", b"svc"), *draw(FIELDS))
        body = draw(st.binary(max_size=80))
        framing = draw(
            st.sampled_from(["none", "length", "chunked"])
            if not body
            else st.sampled_from(["length", "chunked"])
        )
        if framing == "length":
            fields = (*fields, (b"Content-Length", b"%d" % len(body)))
            kind = BodyKind(Framing.CONTENT_LENGTH, len(body))
            encoded = body
        elif framing == "chunked":
            fields = (*fields, (b"Transfer-Encoding", b"chunked"))
            kind = CHUNKED_BODY
            cuts = sorted(
                set(draw(st.lists(st.integers(0, len(body)), max_size=4))) | {0, len(body)}
            )
            encoded = (
                b"".join(serialize_chunk(body[a:b]) for a, b in itertools.pairwise(cuts))
                + LAST_CHUNK
            )
        else:
            kind = NO_BODY
            encoded = b""
        head = RequestHead(method, target, headers=fields, body=kind)
        wire += serialize_request_head(head) + encoded
        expected += [head, *([Body(body)] if body else []), END]
    return wire, expected


@settings(max_examples=150)
@given(case=request_wires(), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_generated_requests_survive_any_split(
    case: tuple[bytes, list[Event]], cuts: list[int]
) -> None:
    wire, expected = case
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    assert requests([wire[a:b] for a, b in itertools.pairwise(points)]) == expected


@given(st.binary(max_size=200))
def test_garbage_raises_only_http_error(data: bytes) -> None:
    for parser in (RequestParser(), ResponseParser()):
        if isinstance(parser, ResponseParser):
            parser.expect(b"GET")
        with contextlib.suppress(HttpError):
            parser.feed(data)
            parser.feed_eof()


@given(
    case=request_wires(),
    position=st.integers(min_value=0),
    byte=st.sampled_from(b" \t\r\n:;,0aZ\x00\x7f\xff"),
)
def test_corrupted_requests_raise_only_http_error(
    case: tuple[bytes, list[Event]], position: int, byte: int
) -> None:
    wire = bytearray(case[0])
    wire[position % len(wire)] = byte
    with contextlib.suppress(HttpError):
        requests(bytes(wire))


@st.composite
def response_wires(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[Event]]:
    """Methods, a pipeline of responses to them (the last maybe until-close), and the events."""
    methods: list[bytes] = []
    wire = b""
    expected: list[Event] = []
    count = draw(st.integers(1, 4))
    for index in range(count):
        method = draw(st.sampled_from([b"GET", b"HEAD", b"POST"]))
        status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
        body = draw(st.binary(max_size=60))
        framings = ["length", "chunked"] + (["close"] if index == count - 1 else [])
        framing = draw(st.sampled_from(framings))
        if draw(st.booleans()):
            interim = ResponseHead(100, b"Continue")
            wire += serialize_response_head(interim)
            expected.append(interim)
        bodiless = method == b"HEAD" or status in (204, 304)
        fields: Headers = ((b"Server", b"test"), *draw(FIELDS))
        if framing == "length":
            fields = (*fields, (b"Content-Length", b"%d" % len(body)))
            kind = BodyKind(Framing.CONTENT_LENGTH, len(body))
            encoded = body
        elif framing == "chunked":
            fields = (*fields, (b"Transfer-Encoding", b"chunked"))
            kind = CHUNKED_BODY
            encoded = serialize_chunk(body) + LAST_CHUNK
        else:
            kind = UNTIL_CLOSE_BODY
            encoded = body
        keep_alive = framing != "close" or bodiless
        head = ResponseHead(
            status, b"Reason", b"1.1", fields, keep_alive, NO_BODY if bodiless else kind
        )
        methods.append(method)
        wire += serialize_response_head(head) + (b"" if bodiless else encoded)
        expected += [head, *([Body(body)] if body and not bodiless else []), END]
    return methods, wire, expected


@settings(max_examples=150)
@given(case=response_wires(), cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12))
def test_generated_responses_survive_any_split(
    case: tuple[list[bytes], bytes, list[Event]], cuts: list[int]
) -> None:
    methods, wire, expected = case
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    assert responses(chunks, methods, eof=True) == expected


def test_chunk_data_that_looks_like_an_end_is_body() -> None:
    sneaky = b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n\r\n\r\nX: y\r\n\r\n"
    wire = (
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + serialize_chunk(sneaky)
        + serialize_chunk(b"\r\n" * 5)
        + LAST_CHUNK
        + GET
    )
    expected = [
        RequestHead(
            b"POST",
            b"/",
            headers=((b"Host", b"a"), (b"Transfer-Encoding", b"chunked")),
            body=CHUNKED_BODY,
        ),
        Body(sneaky + b"\r\n" * 5),
        END,
        get_head(),
        END,
    ]
    for chunks in splits_of(wire):
        assert requests(chunks) == expected
