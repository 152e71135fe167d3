"""Header-list helpers: hop-by-hop stripping, lookups, rewrites."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent.protocol.headers import (
    Headers,
    add_header,
    append_forwarded_for,
    get_all_headers,
    get_header,
    header_tokens,
    remove_headers,
    set_header,
    strip_hop_by_hop,
)

FIELDS: Headers = (
    (b"Host", b"svc"),
    (b"Accept", b"text/html"),
    (b"accept", b"*/*"),
    (b"X-Empty", b""),
)


def test_get_header_is_case_insensitive_and_returns_the_first() -> None:
    assert get_header(FIELDS, b"ACCEPT") == b"text/html"
    assert get_header(FIELDS, b"x-empty") == b""
    assert get_header(FIELDS, b"missing") is None


def test_get_all_headers_keeps_wire_order() -> None:
    assert get_all_headers(FIELDS, b"Accept") == (b"text/html", b"*/*")
    assert get_all_headers(FIELDS, b"missing") == ()


def test_header_tokens() -> None:
    fields: Headers = ((b"Connection", b" Keep-Alive ,, Upgrade"), (b"connection", b"X-Foo"))
    assert header_tokens(fields, b"connection") == (b"keep-alive", b"upgrade", b"x-foo")


def test_set_header_replaces_in_place_and_drops_the_others() -> None:
    assert set_header(FIELDS, b"Accept", b"application/json") == (
        (b"Host", b"svc"),
        (b"Accept", b"application/json"),
        (b"X-Empty", b""),
    )
    assert set_header(FIELDS, b"X-New", b"1") == (*FIELDS, (b"X-New", b"1"))
    assert add_header(FIELDS, b"Accept", b"x") == (*FIELDS, (b"Accept", b"x"))


def test_remove_headers() -> None:
    assert remove_headers(FIELDS, {b"ACCEPT", b"x-empty"}) == ((b"Host", b"svc"),)
    assert remove_headers(FIELDS, {b"x-meshagent-source"}) is FIELDS
    assert remove_headers(FIELDS, ()) is FIELDS
    spoofed: Headers = ((b"Host", b"a"), (b"X-Meshagent-Source", b"spiffe://m/service/admin"))
    assert remove_headers(spoofed, [b"x-meshagent-source"]) == ((b"Host", b"a"),)


HOP: Headers = (
    (b"Host", b"svc"),
    (b"Connection", b"keep-alive, X-Private, Upgrade"),
    (b"Keep-Alive", b"timeout=5"),
    (b"Proxy-Connection", b"keep-alive"),
    (b"Proxy-Authorization", b"Basic xyz"),
    (b"TE", b"trailers"),
    (b"Trailer", b"Expires"),
    (b"Transfer-Encoding", b"chunked"),
    (b"Upgrade", b"websocket"),
    (b"X-Private", b"secret"),
    (b"X-Public", b"ok"),
    (b"Content-Length", b"3"),
)


def test_strip_hop_by_hop() -> None:
    assert strip_hop_by_hop(HOP) == (
        (b"Host", b"svc"),
        (b"X-Public", b"ok"),
        (b"Content-Length", b"3"),
    )


def test_strip_hop_by_hop_can_pass_an_upgrade_through() -> None:
    assert strip_hop_by_hop(HOP, keep_upgrade=True) == (
        (b"Host", b"svc"),
        (b"Upgrade", b"websocket"),
        (b"X-Public", b"ok"),
        (b"Content-Length", b"3"),
        (b"Connection", b"upgrade"),
    )
    # No Upgrade field: nothing to keep, no Connection added.
    assert strip_hop_by_hop(((b"Connection", b"upgrade"),), keep_upgrade=True) == ()


def test_connection_cannot_remove_host_or_content_length() -> None:
    fields: Headers = (
        (b"Host", b"svc"),
        (b"Content-Length", b"3"),
        (b"Connection", b"Host, content-length, x-forwarded-for"),
        (b"X-Forwarded-For", b"10.0.0.1"),
    )
    assert strip_hop_by_hop(fields) == ((b"Host", b"svc"), (b"Content-Length", b"3"))


def test_strip_hop_by_hop_returns_the_same_tuple_when_nothing_goes() -> None:
    fields: Headers = ((b"Host", b"svc"), (b"Accept", b"*/*"))
    assert strip_hop_by_hop(fields) is fields


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((), ((b"X-Forwarded-For", b"10.0.0.9"),)),
        (
            ((b"x-forwarded-for", b"1.1.1.1"), (b"Host", b"a"), (b"X-Forwarded-For", b"2.2.2.2")),
            ((b"X-Forwarded-For", b"1.1.1.1, 2.2.2.2, 10.0.0.9"), (b"Host", b"a")),
        ),
    ],
)
def test_append_forwarded_for(fields: Headers, expected: Headers) -> None:
    assert append_forwarded_for(fields, b"10.0.0.9") == expected


def test_an_existing_forwarded_field_gets_the_client_too() -> None:
    fields: Headers = ((b"Forwarded", b"for=1.1.1.1;proto=https"), (b"forwarded", b"for=2.2.2.2"))
    assert append_forwarded_for(fields, b"10.0.0.9") == (
        (b"Forwarded", b"for=1.1.1.1;proto=https, for=2.2.2.2, for=10.0.0.9"),
        (b"X-Forwarded-For", b"10.0.0.9"),
    )
    v6 = append_forwarded_for(((b"Forwarded", b"for=a"),), b"::1")
    assert (b"Forwarded", b'for=a, for="[::1]"') in v6


NAMES = st.sampled_from(
    [
        b"Host",
        b"Connection",
        b"Upgrade",
        b"TE",
        b"Proxy-Foo",
        b"X-A",
        b"x-a",
        b"Keep-Alive",
        b"Content-Length",
    ]
)
VALUES = st.sampled_from([b"", b"x", b"x-a", b"upgrade, x-a", b"close", b"host"])


@given(st.lists(st.tuples(NAMES, VALUES), max_size=10).map(tuple), st.booleans())
def test_strip_hop_by_hop_properties(fields: Headers, keep_upgrade: bool) -> None:
    stripped = strip_hop_by_hop(fields, keep_upgrade=keep_upgrade)
    names = {name.lower() for name, _ in stripped}
    assert not names & {b"te", b"keep-alive", b"transfer-encoding"}
    assert not any(name.startswith(b"proxy-") for name in names)
    assert get_all_headers(stripped, b"host") == get_all_headers(fields, b"host")
    assert get_all_headers(stripped, b"content-length") == get_all_headers(
        fields, b"content-length"
    )
    if not keep_upgrade:
        assert not names & {b"connection", b"upgrade"}
    assert strip_hop_by_hop(stripped, keep_upgrade=keep_upgrade) == stripped  # idempotent
