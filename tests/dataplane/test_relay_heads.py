"""The C relay's reading of heads (``_pump.relay_request_head`` / ``relay_response_head``)
against the Python proxy, the reference: for thousands of generated heads, whatever the
relay takes it must forward byte for byte as ``http_proxy`` would (same framing, same
keep-alive, same fields dropped and added), and it must take the plain ones. What it
does not take, Python serves; that is tested end to end in test_http.py."""

from __future__ import annotations

import random

import pytest

from meshagent.dataplane.http_outbound import REQUEST_ID, TRACEPARENT
from meshagent.dataplane.http_proxy import SOURCE_HEADER, mesh_request_headers
from meshagent.dataplane.nativepump import native_problem
from meshagent.protocol.headers import (
    FORWARDED,
    FORWARDED_FOR,
    append_forwarded_for,
    get_header,
    strip_hop_by_hop,
)
from meshagent.protocol.http1 import (
    Framing,
    HttpError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    serialize_request_head,
    serialize_response_head,
)

try:
    from meshagent.dataplane import _pump
except ImportError:  # the C pump is not built: nothing to compare
    _pump = None

pytestmark = pytest.mark.skipif(_pump is None, reason=f"no C pump: {native_problem()}")

DROP = (SOURCE_HEADER,)
ADD = SOURCE_HEADER + b": web\r\n"

REQUEST_LINES = [
    b"GET /a HTTP/1.1", b"GET /orders/7?q=1&r=%20x HTTP/1.1", b"HEAD / HTTP/1.1",
    b"POST /upload HTTP/1.1", b"PUT /x HTTP/1.1", b"DELETE /x HTTP/1.1", b"PATCH /x HTTP/1.1",
    b"OPTIONS /x HTTP/1.1", b"get /a HTTP/1.1", b"GET /a HTTP/1.0", b"GET http://h/a HTTP/1.1",
    b"OPTIONS * HTTP/1.1", b"CONNECT h:1 HTTP/1.1", b"GET /a#frag HTTP/1.1", b"GET /a b HTTP/1.1",
    b"GET /\xff HTTP/1.1", b"GET /a HTTP/2.0", b"BREW /pot HTTP/1.1", b"GET /a  HTTP/1.1",
    b"GET /{x} HTTP/1.1", b"GET  /a HTTP/1.1", b"GET /a HTTP/1.1 ", b"GET /" + b"a" * 9000 + b" HTTP/1.1",
]
REQUEST_FIELDS = [
    b"Host: h", b"Host: h", b"Host: h", b"host: h", b"Host:h", b"Host:  h", b"Host: h ",
    b"X-A: b", b"X-A: b\tc d", b"X-Empty:", b"X-Empty: ", b"Accept: */*", b"Cookie: a=b; c=d",
    b"Content-Length: 3", b"content-length: 03", b"Content-Length: x", b"Content-Length: 3",
    b"Content-Length: 12", b"Transfer-Encoding: chunked", b"Connection: close",
    b"Connection: keep-alive", b"Connection: Keep-Alive, close", b"Connection: x-foo",
    b"Connection: close,", b"Keep-Alive: timeout=5", b"Proxy-Authorization: x",
    b"Proxy-Connection: keep-alive", b"TE: trailers", b"Trailer: X-T", b"Upgrade: websocket",
    b"Expect: 100-continue", b"X-Meshagent-Source: forged", b"x-meshagent-source: forged",
    b"x-request-id: abc", b"X-Request-Id: second", b" folded", b"Bad Name: x", b"X-Hi: \x80",
    b"Close: x", b"X-Long: " + b"v" * 20_000, b"X-Forwarded-For: 1.2.3.4",
    b"Forwarded: for=1.2.3.4", b"traceparent: 00-abc", b"TraceParent: x",
]

STATUS_LINES = [
    b"HTTP/1.1 200 OK", b"HTTP/1.1 200 ", b"HTTP/1.1 200", b"HTTP/1.0 200 OK",
    b"HTTP/1.1 201 Created", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 404 Not Found", b"HTTP/1.1 503 Service Unavailable", b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 599 X",
    b"HTTP/1.1 600 X", b"HTTP/2 200 OK", b"HTTP/1.1 200 OK ", b"HTTP/1.1 099 X",
    b"HTTP/1.1 2000 X", b"http/1.1 200 OK", b"HTTP/1.1 200 \xe9t\xe9",
]
RESPONSE_FIELDS = [
    b"Content-Length: 5", b"Content-Length: 5", b"Content-Length: 0", b"content-length: 12",
    b"Content-Length: -1", b"Transfer-Encoding: chunked", b"Connection: close",
    b"Connection: keep-alive", b"Connection: upgrade", b"Keep-Alive: timeout=5",
    b"Upgrade: h2c", b"Proxy-Authenticate: x", b"Trailer: X-T", b"TE: trailers",
    b"Set-Cookie: a=b; Path=/", b"X-App: orders", b"Server: x", b"X-Empty:", b"X-A:b",
    b"X-A: b ", b"Close: x", b" folded",
]


def _head(rng: random.Random, line: bytes, fields: list[bytes], most: int) -> bytes:
    chosen = rng.sample(fields, rng.randint(0, most))
    return b"\r\n".join([line, *chosen]) + b"\r\n\r\n"


def _python_request(data: bytes) -> RequestHead | None:
    try:
        events = RequestParser().feed(data)
    except HttpError:
        return None
    head = events[0] if events else None
    return head if isinstance(head, RequestHead) else None


def test_every_request_head_the_relay_takes_is_forwarded_as_python_would() -> None:
    assert _pump is not None
    rng = random.Random(5)
    taken = 0
    for n in range(6000):
        line = rng.choice(REQUEST_LINES)
        data = _head(rng, line, REQUEST_FIELDS, 7)
        if n % 3 == 0:  # the usual shape: a Host, maybe a body
            data = data.replace(b"\r\n", b"\r\nHost: h\r\n", 1)
        relay = _pump.relay_request_head(data, DROP, ADD)
        assert relay is not None, data  # a whole head: taken or not, never "not complete"
        if relay is False:
            continue
        taken += 1
        head_len, forwarded, length, keep_alive, method, path, request_id = relay
        python = _python_request(data)
        assert python is not None, data
        assert head_len == len(data)
        assert python.http_version == b"1.1" and python.upgrade is None
        assert not python.expect_continue
        assert python.body.framing in (Framing.NONE, Framing.CONTENT_LENGTH), data
        assert length == (python.body.content_length or 0)
        assert bool(keep_alive) == python.keep_alive
        assert method == python.method.decode() and path == python.target.split(b"?")[0].decode()
        assert request_id == get_header(python.headers, b"x-request-id")
        expected = serialize_request_head(python, headers=mesh_request_headers(python, source="web"))
        assert forwarded == expected, data
    assert taken > 150  # most generated heads carry something odd; the plain ones are taken


IDS = bytes(random.Random(3).choices(b"0123456789abcdef", k=80))


def test_every_request_an_outbound_relay_takes_is_forwarded_as_python_would() -> None:
    """The outbound's edits: ids added when missing, X-Forwarded-For appended, and a
    request that already has X-Forwarded-For or Forwarded left to Python."""
    assert _pump is not None
    rng = random.Random(9)
    taken = 0
    for n in range(6000):
        data = _head(rng, rng.choice(REQUEST_LINES), REQUEST_FIELDS, 5)
        if n % 2 == 0:
            data = data.replace(b"\r\n", b"\r\nHost: h\r\n", 1)
        relay = _pump.relay_request_head(
            data, add=b"X-Forwarded-For: 10.1.2.3\r\n", refuse=(FORWARDED_FOR, FORWARDED),
            ids=IDS,
        )
        if relay is False:
            continue
        taken += 1
        head_len, forwarded, length, keep_alive, _, _, request_id = relay
        python = _python_request(data)
        assert python is not None and head_len == len(data), data
        assert get_header(python.headers, FORWARDED_FOR) is None
        assert get_header(python.headers, FORWARDED) is None
        # http_outbound._mesh_headers then append_forwarded_for, with these ids
        headers = strip_hop_by_hop(python.headers)
        if get_header(headers, REQUEST_ID) is None:
            headers = (*headers, (REQUEST_ID, IDS[:32]))
        if get_header(headers, TRACEPARENT) is None:
            headers = (*headers, (TRACEPARENT, b"00-" + IDS[32:64] + b"-" + IDS[64:] + b"-01"))
        headers = append_forwarded_for(headers, b"10.1.2.3")
        assert forwarded == serialize_request_head(python, headers=headers), data
        assert request_id == get_header(headers, REQUEST_ID)
        assert length == (python.body.content_length or 0) and bool(keep_alive) == python.keep_alive
    assert taken > 150


def test_the_plain_requests_are_taken() -> None:
    assert _pump is not None
    for data in (
        b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /p?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nhi",
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\nX-Meshagent-Source: forged\r\n\r\n",
    ):
        assert _pump.relay_request_head(data, DROP, ADD), data


def test_a_request_head_that_is_not_whole_is_waited_for_then_left_to_python() -> None:
    assert _pump is not None
    assert _pump.relay_request_head(b"GET /a HTTP/1.1\r\nHost: h\r\n", DROP, ADD) is None
    assert _pump.relay_request_head(b"", DROP, ADD) is None
    # 16 KiB without the blank line: not the relay's (Python applies its own limits)
    assert _pump.relay_request_head(b"GET /a HTTP/1.1\r\nX: " + b"v" * 17000, DROP, ADD) is False


def test_every_response_head_the_relay_takes_is_forwarded_as_python_would() -> None:
    assert _pump is not None
    rng = random.Random(7)
    taken = 0
    for _ in range(6000):
        data = _head(rng, rng.choice(STATUS_LINES), RESPONSE_FIELDS, 5)
        method = rng.choice([b"GET", b"HEAD", b"POST"])
        request_keep = rng.random() < 0.8
        relay = _pump.relay_response_head(data, method == b"HEAD", request_keep)
        assert relay is not None, data
        if relay is False:
            continue
        taken += 1
        status, head_len, forwarded, length, keep_alive, down_close = relay
        parser = ResponseParser()
        parser.expect(method)
        try:
            events = parser.feed(data)
        except HttpError as exc:
            raise AssertionError(f"the relay took what Python refuses ({exc}): {data!r}") from None
        python = events[0]
        assert isinstance(python, ResponseHead) and head_len == len(data)
        assert python.status == status and 200 <= status <= 599
        assert python.body.framing in (Framing.NONE, Framing.CONTENT_LENGTH), data
        assert length == (python.body.content_length or 0)
        assert bool(keep_alive) == python.keep_alive
        # The client's close only: the upstream's stays between the agent and it (as
        # http_proxy._delimited_down: the relay takes only bodies of known length).
        close = not request_keep
        assert bool(down_close) == close
        headers = strip_hop_by_hop(python.headers)
        if close:
            headers = (*headers, (b"Connection", b"close"))
        plain = ResponseHead(status=python.status, reason=python.reason)
        assert forwarded == serialize_response_head(plain, headers=headers), data
    assert taken > 500


def test_the_plain_responses_are_taken_and_the_odd_ones_left_to_python() -> None:
    assert _pump is not None
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    assert _pump.relay_response_head(ok, False, True)[3] == 5
    assert _pump.relay_response_head(ok, True, True)[3] == 0  # the answer to a HEAD
    for data in (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # Python re-chunks
        b"HTTP/1.1 200 OK\r\n\r\n",  # until the upstream closes
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    ):
        assert _pump.relay_response_head(data, False, True) is False, data
    assert _pump.relay_response_head(b"HTTP/1.1 200 OK\r\n", False, True) is None
