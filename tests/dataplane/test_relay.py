"""The C pump's HTTP relay (``NativePump.relay``) on real loopback sockets, with real
TLS towards the caller as on an inbound: what it serves itself, what it hands back to
Python and with which bytes, and when it ends. End to end through two agents (Python
serving what the relay hands back) is in test_http.py."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from meshagent.dataplane.connection import Drain
from meshagent.dataplane.http_proxy import Relay, RelaySession, _Sessions
from meshagent.dataplane.nativepump import (
    ENV_SWITCH,
    NativePump,
    NativeRefused,
    Offer,
    Record,
    RelayEnd,
    RelayOutcome,
    Summary,
    stream_end,
)
from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.sslsocket import SslSocketStream
from tests.support.net import full_backlog, plain_stream, wait_until
from tests.support.tls import Contexts, tcp_pair, tls_pair

if os.environ.get(ENV_SWITCH) == "0":
    pytest.skip(f"the C pump is turned off by {ENV_SWITCH}=0", allow_module_level=True)

ADD = b"x-meshagent-source: web\r\n"


@dataclass
class Rig:
    """caller (TLS client, the test) -> [down | relay | up] -> app (plain, the test)."""

    caller: SslSocketStream
    down: SslSocketStream
    up: PlainSocketStream
    app: trio.SocketStream
    drain: Drain = field(default_factory=Drain)
    records: list[Record] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)

    def take(self, records: list[Record], summaries: list[Summary]) -> None:
        self.records.extend(records)
        self.summaries.extend(summaries)

    async def relay(
        self, pump: NativePump, *, hold: float = 5, head: float = 5, idle: float = 5,
        initial: bytes = b"", **options: Any,
    ) -> RelayEnd:
        """The relay as an inbound runs it (``options``: other edits, as an outbound's)."""
        down, up = stream_end(self.down), stream_end(self.up)
        assert down is not None and up is not None
        edits = {"drop": (b"x-meshagent-source",), "add": ADD, **options}
        return await pump.relay(
            down, up, idle_seconds=idle, hold_seconds=hold, head_seconds=head,
            on_records=self.take,
            stop_when=functools.partial(self.drain.idle, listener="in"), initial=initial,
            **edits,
        )


@asynccontextmanager
async def rig(contexts: Contexts) -> AsyncIterator[Rig]:
    async with tls_pair(contexts) as (down, caller):
        app, up_tcp = await tcp_pair()
        up = plain_stream(up_tcp)
        try:
            yield Rig(caller, down, up, app)
        finally:
            for stream in (up, app):
                await trio.aclose_forcefully(stream)


async def read_until(stream: trio.abc.ReceiveStream, end: bytes, *, have: bytes = b"") -> bytes:
    """Bytes until ``have`` ends with (or holds) ``end``."""
    with trio.fail_after(5):
        while end not in have:
            data = await stream.receive_some(65536)
            assert data, f"closed before {end!r}; got {have!r}"
            have += data
    return have


async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    have = b""
    with trio.fail_after(10):
        while len(have) < size:
            data = await stream.receive_some(65536)
            assert data, f"closed after {len(have)} of {size} bytes"
            have += data
    return have


def ok(body: bytes, *fields: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n" % len(body)
    return head + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


async def test_requests_are_served_in_c_with_mesh_headers_and_recorded(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        outcome: list[RelayEnd] = []

        async def run() -> None:
            outcome.append(await r.relay(pump))

        nursery.start_soon(run)
        # three pipelined requests in one write: a GET with hop-by-hop and forged
        # fields, a POST with a body, a HEAD
        await r.caller.send_all(
            b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\n"
            b"X-Meshagent-Source: forged\r\nX-Request-Id: r1\r\n\r\n"
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
            b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n"
        )
        seen = await read_until(r.app, b"\r\n\r\n")
        assert seen == (
            b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Request-Id: r1\r\n" + ADD + b"\r\n"
        )
        await r.app.send_all(ok(b"one", b"Connection: keep-alive", b"X-App: a"))
        assert await read_until(r.caller, b"one") == ok(b"one", b"X-App: a")
        seen = await read_until(r.app, b"hello")
        assert seen == b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n" + ADD + b"\r\nhello"
        await r.app.send_all(ok(b"two"))
        assert await read_until(r.caller, b"two") == ok(b"two")
        assert await read_until(r.app, b"\r\n\r\n") == b"HEAD /h HTTP/1.1\r\nHost: h\r\n" + ADD + b"\r\n"
        await r.app.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")  # no body: HEAD
        assert await read_until(r.caller, b"\r\n\r\n") == b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
        await r.caller.aclose()
    assert outcome[0].outcome is RelayOutcome.CLOSED and outcome[0].upstream_reusable
    assert [(s, i, o, m, p, rid) for s, i, o, _, m, p, rid in r.records] == [
        (200, 0, 3, "GET", "/a", b"r1"), (200, 5, 3, "POST", "/p", None),
        (200, 0, 0, "HEAD", "/h", None),
    ]


async def test_a_relay_waiting_for_a_request_holds_no_buffer(
    contexts: Contexts, pump: NativePump
) -> None:
    """An idle keep-alive connection costs no request or response buffer, however big
    its last request grew them; the next request gets them back."""
    engine = pump._engine

    async def buffers_are(empty: bool) -> bool:
        return (int(engine.relay_buffers()) == 0) == empty

    async with rig(contexts) as r, trio.open_nursery() as nursery:
        nursery.start_soon(r.relay, pump)
        await wait_until(lambda: buffers_are(True), timeout=5)  # waits; none made yet
        body = b"b" * 40_000  # the request buffer doubles from 4 KiB to 64 KiB for it
        for n in range(2):
            await r.caller.send_all(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 40000\r\n")
            await wait_until(lambda: buffers_are(False), timeout=5)  # a head, part read
            await r.caller.send_all(b"\r\n" + body)
            assert (await read_until(r.app, body)).endswith(ADD + b"\r\n" + body)
            await r.app.send_all(ok(b"%d" % n))
            assert await read_until(r.caller, b"%d" % n) == ok(b"%d" % n)
            await wait_until(lambda: buffers_are(True), timeout=5)
        await r.caller.aclose()
    assert [(s, i, m) for s, i, _, _, m, _, _ in r.records] == [(200, 40000, "POST")] * 2


async def test_a_request_it_does_not_take_comes_back_with_every_byte(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        sent = b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        await r.caller.send_all(sent)
        with trio.fail_after(5):
            end = await r.relay(pump)
        assert end.outcome is RelayOutcome.REQUEST and end.downstream == sent
        assert end.upstream_reusable and r.records == []
        with trio.move_on_after(0.2):  # nothing reached the app
            assert await r.app.receive_some(10) == b"not reached"


async def test_a_request_started_in_python_goes_on_in_c(contexts: Contexts, pump: NativePump) -> None:
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(r.relay, pump, initial=b"GET /i HTTP/1.1\r\nHo"))
        await r.caller.send_all(b"st: h\r\n\r\n")
        assert await read_until(r.app, b"\r\n\r\n") == b"GET /i HTTP/1.1\r\nHost: h\r\n" + ADD + b"\r\n"
        await r.app.send_all(ok(b"i"))
        assert await read_until(r.caller, b"\r\n\r\ni") == ok(b"i")
        nursery.cancel_scope.cancel()


async def test_a_response_it_does_not_take_comes_back_after_the_request_went_up(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        request = b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\nGET /next HTTP/1.1\r\n"
        await r.caller.send_all(request)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until, r.app, b"\r\n\r\n")
            response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
            await r.app.send_all(response)
            with trio.fail_after(5):
                end = await r.relay(pump)
        assert end.outcome is RelayOutcome.RESPONSE and end.upstream_error is None
        assert end.downstream == request  # the request sent, and what followed it
        assert end.response == response


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_an_upstream_that_fails_before_its_head_comes_back_with_why(
    contexts: Contexts, pump: NativePump, how: str
) -> None:
    async with rig(contexts) as r:
        await r.caller.send_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        async with trio.open_nursery() as nursery:

            async def fail() -> None:
                await read_until(r.app, b"\r\n\r\n")
                if how == "reset":
                    r.app.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                await r.app.aclose()

            nursery.start_soon(fail)
            with trio.fail_after(5):
                end = await r.relay(pump)
        assert end.outcome is RelayOutcome.RESPONSE and end.response == b""
        if how == "reset":
            assert end.upstream_error is not None and "reset" in end.upstream_error
        else:  # Python reads the end itself, as from any upstream
            assert end.upstream_error is None


async def test_it_gives_the_upstream_back_after_its_hold_without_a_request(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        started = trio.current_time()
        with trio.fail_after(5):
            end = await r.relay(pump, hold=0.3)
        assert end.outcome is RelayOutcome.IDLE and end.upstream_reusable
        assert trio.current_time() - started >= 0.25  # not before its hold


async def test_a_head_that_takes_too_long_is_a_head_timeout(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        await r.caller.send_all(b"GET / HTTP/1.1\r\nHost")
        with trio.fail_after(5):
            end = await r.relay(pump, head=0.3)
        assert end.outcome is RelayOutcome.HEAD_TIMEOUT
        # a head that came whole but whose body did not: Python goes on with it
        await r.caller.send_all(b": h\r\nContent-Length: 9\r\n\r\nabc")
        with trio.fail_after(5):
            end = await r.relay(pump, head=0.3, initial=end.downstream)
        assert end.outcome is RelayOutcome.REQUEST
        assert end.downstream.endswith(b"\r\n\r\nabc")


async def test_a_drain_ends_it_at_once_between_requests_and_after_one_in_flight(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(r.relay, pump))
            await trio.sleep(0.1)
            r.drain.begin()
        # in flight: the request goes on to its answer, then the relay ends
        r.drain = Drain()
        outcome: list[RelayEnd] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                outcome.append(await r.relay(pump))

            nursery.start_soon(run)
            await r.caller.send_all(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
            await read_until(r.app, b"\r\n\r\n")
            r.drain.begin()
            await trio.sleep(0.1)
            await r.app.send_all(ok(b"late"))
            assert await read_until(r.caller, b"late") == ok(b"late")
        assert outcome[0].outcome is RelayOutcome.STOPPED
        assert [rec[0] for rec in r.records] == [200]


async def test_a_relay_started_during_a_drain_ends_at_once(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        r.drain.begin()
        with trio.fail_after(5):
            end = await r.relay(pump)
        assert end.outcome is RelayOutcome.STOPPED and r.records == []


async def test_reclaim_ends_the_relay_idle_between_requests_once(
    contexts: Contexts, pump: NativePump
) -> None:
    # A listener at its connection limit reclaims the longest-idle connection: the
    # relay's stop is registered like a cancel scope, and told to the engine at once.
    async with rig(contexts) as r:
        outcome: list[RelayEnd] = []

        async def run() -> None:
            outcome.append(await r.relay(pump))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await r.caller.send_all(b"GET /one HTTP/1.1\r\nHost: h\r\n\r\n")
            await read_until(r.app, b"\r\n\r\n")
            await r.app.send_all(ok(b"one"))
            assert await read_until(r.caller, b"one") == ok(b"one")
            with trio.fail_after(5):
                while not r.drain.reclaim("in"):  # registered as soon as the relay runs
                    await trio.sleep(0.01)
        assert outcome[0].outcome is RelayOutcome.STOPPED
        assert not r.drain.reclaim("in")  # it left the drain's register when it ended


async def test_connection_close_ends_the_callers_connection_or_only_the_upstream(
    contexts: Contexts, pump: NativePump
) -> None:
    for request, response, told, outcome, reusable in [
        # the caller's: it is told, and its connection ends after the exchange
        (b"Connection: close\r\n", b"", b"Connection: close", RelayOutcome.CLOSE, True),
        # the upstream's is hop-by-hop: the caller keeps its connection, not told
        (b"", b"Connection: close", b"", RelayOutcome.UPSTREAM_SPENT, False),
    ]:
        async with rig(contexts) as r:
            await r.caller.send_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n" + request + b"\r\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_until, r.app, b"\r\n\r\n")
                await r.app.send_all(ok(b"bye", *filter(None, [response])))
                with trio.fail_after(5):
                    end = await r.relay(pump)
            assert await read_until(r.caller, b"bye") == ok(b"bye", *filter(None, [told]))
            assert end.outcome is outcome
            assert end.upstream_reusable is reusable
            assert end.downstream == b""


async def test_an_upstream_that_sends_more_than_its_response_is_not_used_again(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        nxt = b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
        await r.caller.send_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n" + nxt)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until, r.app, b"\r\n\r\n")
            await r.app.send_all(ok(b"one") + b"garbage")
            with trio.fail_after(5):
                end = await r.relay(pump)
        # as in Python: the caller keeps its connection, the upstream is closed, and
        # the next request needs another
        assert await read_until(r.caller, b"one") == ok(b"one")
        assert end.outcome is RelayOutcome.UPSTREAM_SPENT and not end.upstream_reusable
        assert end.downstream == nxt


async def test_a_body_cut_short_fails_and_counts_as_502(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        await r.caller.send_all(b"GET /cut HTTP/1.1\r\nHost: h\r\n\r\n")
        async with trio.open_nursery() as nursery:

            async def cut() -> None:
                await read_until(r.app, b"\r\n\r\n")
                await r.app.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 70_000)
                await r.app.aclose()

            nursery.start_soon(cut)
            with trio.fail_after(5), pytest.raises(
                trio.BrokenResourceError, match="upstream: closed after 70000 of 100000 body bytes"
            ):
                await r.relay(pump)
        # its record came before the end (NativePump hands records over first)
        assert [(rec[0], rec[2]) for rec in r.records] == [(502, 70_000)]


async def test_with_a_summary_its_exchanges_are_summed_up_not_recorded(
    contexts: Contexts, pump: NativePump
) -> None:
    """No access log: the relay sums its exchanges up by status class and latency bound,
    at most 64 to a summary, and the last ones before its end; a cut body counts 5xx."""
    requests = 150
    async with rig(contexts) as r, trio.open_nursery() as nursery:

        async def app() -> None:
            for n in range(requests):
                await read_until(r.app, b"\r\n\r\n")
                status = b"404 Not Found" if n % 10 == 0 else b"200 OK"
                await r.app.send_all(b"HTTP/1.1 %s\r\nContent-Length: 2\r\n\r\nok" % status)
            await read_until(r.app, b"\r\n\r\n")  # the last: cut inside its body
            await r.app.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
            await r.app.aclose()

        nursery.start_soon(app)
        await r.caller.send_all(b"GET /s HTTP/1.1\r\nHost: h\r\n\r\n" * (requests + 1))
        # bounds no exchange reaches and one every exchange does (0 < seconds <= 60)
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="after 3 of 10"):
            await r.relay(pump, summary=(0.0, 60.0))
    assert r.records == []
    assert len(r.summaries) >= 3 and all(s[2] <= 64 for s in r.summaries)
    classes = [sum(s[0][n] for s in r.summaries) for n in range(6)]
    assert classes == [0, 0, 135, 0, 15, 1]  # 404 every tenth, then the cut: 502
    assert [sum(s[1][n] for s in r.summaries) for n in range(3)] == [0, requests + 1, 0]
    assert sum(s[2] for s in r.summaries) == requests + 1
    assert all(0 < s[3] < 60 * s[2] for s in r.summaries)


@pytest.mark.parametrize(
    ("summary", "problem"),
    [
        ((0.1, 0.1), "ascending"),
        ((0.2, 0.1), "ascending"),
        ((float("nan"),), "ascending"),
        (tuple(float(n) for n in range(33)), "at most 32"),
        ([0.1], "tuple"),
        (("1",), "must be real number"),
    ],
)
async def test_a_summary_needs_at_most_32_ascending_bounds(
    contexts: Contexts, pump: NativePump, summary: Any, problem: str
) -> None:
    async with rig(contexts) as r:
        with pytest.raises(NativeRefused, match=problem):
            await r.relay(pump, summary=summary)


async def test_a_big_response_streams_through_with_backpressure(
    contexts: Contexts, pump: NativePump
) -> None:
    body = os.urandom(8 * 1024 * 1024)
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(r.relay, pump))
        await r.caller.send_all(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
        await read_until(r.app, b"\r\n\r\n")
        nursery.start_soon(r.app.send_all, ok(body))
        await trio.sleep(0.3)  # the caller reads nothing yet: the relay must wait, not buffer
        got = await read_exactly(r.caller, len(ok(body)))
        assert got == ok(body)
        nursery.cancel_scope.cancel()


async def test_an_outbound_relay_adds_ids_and_forwarded_for_then_renews(
    contexts: Contexts, pump: NativePump
) -> None:
    xff = b"X-Forwarded-For: 10.0.0.1\r\n"
    outbound: dict[str, Any] = {
        "drop": (), "add": xff, "refuse": (b"x-forwarded-for", b"forwarded"), "gen_ids": True,
        "max_requests": 2,
    }
    third = b"GET /3 HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"
    async with rig(contexts) as r:
        outcome: list[RelayEnd] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                outcome.append(await r.relay(pump, **outbound))

            nursery.start_soon(run)
            await r.caller.send_all(
                b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n"
                b"GET /2 HTTP/1.1\r\nHost: h\r\nX-Request-Id: mine\r\ntraceparent: 00-t\r\n\r\n"
                + third
            )
            first = await read_until(r.app, b"\r\n\r\n")
            match = re.fullmatch(
                rb"GET /1 HTTP/1.1\r\nHost: h\r\nx-request-id: ([0-9a-f]{32})\r\n"
                rb"traceparent: 00-[0-9a-f]{32}-[0-9a-f]{16}-01\r\n" + re.escape(xff) + rb"\r\n",
                first,
            )
            assert match, first
            await r.app.send_all(ok(b"1"))
            second = await read_until(r.app, b"\r\n\r\n")
            assert second == (
                b"GET /2 HTTP/1.1\r\nHost: h\r\nX-Request-Id: mine\r\ntraceparent: 00-t\r\n"
                + xff + b"\r\n"
            )
            await r.app.send_all(ok(b"2"))
            await read_until(r.caller, ok(b"2"))
        # two served: Python chooses again (a weight, the balancer) for the third
        assert outcome[0].outcome is RelayOutcome.RENEW and outcome[0].downstream == third
        assert [rec[6] for rec in r.records] == [match.group(1), b"mine"]
        # the third has a X-Forwarded-For to extend: Python's
        with trio.fail_after(5):
            end = await r.relay(pump, initial=outcome[0].downstream, **outbound)
        assert end.outcome is RelayOutcome.REQUEST and end.downstream == third


@dataclass
class Renewals:
    """A ``Renewal`` for tests: offers the given upstreams in turn (None: end), and
    notes what the relay did with them."""

    upstreams: list[PlainSocketStream | SslSocketStream | None]
    rig: Rig
    notify_first: bool = False
    offered: list[bool] = field(default_factory=list)  # what offer answered
    switched_after: list[int] = field(default_factory=list)  # records seen at each switch
    reusable: list[bool] = field(default_factory=list)
    settled: int = 0

    async def renew(self, offer: Offer) -> None:
        if not self.upstreams:
            return  # nothing to offer: the relay goes on as it is
        upstream = self.upstreams.pop(0)
        end = None if upstream is None else stream_end(upstream)
        add = NEXT_ADD if end is not None else b""
        self.offered.append(offer(end, add, self.notify_first))

    def switched(self, reusable: bool) -> None:
        self.switched_after.append(len(self.rig.records))
        self.reusable.append(reusable)

    def settle(self) -> None:
        self.settled += 1


NEXT_ADD = b"x-meshagent-source: next\r\n"


async def exchange(caller: trio.abc.Stream, app: trio.abc.Stream, path: bytes, add: bytes) -> None:
    """One request from the caller, seen by ``app`` with ``add``, and its answer."""
    request = b"GET %s HTTP/1.1\r\nHost: h\r\n" % path
    await caller.send_all(request + b"\r\n")
    assert await read_until(app, b"\r\n\r\n") == request + add + b"\r\n"
    await app.send_all(ok(path))
    assert await read_until(caller, path) == ok(path)


async def wait_for(check: Any) -> None:
    with trio.fail_after(5):
        while not check():
            await trio.sleep(0.005)


def start_relay(
    nursery: trio.Nursery, r: Rig, pump: NativePump, **options: Any
) -> list[RelayEnd]:
    """Run the rig's relay in ``nursery``; its end lands in the list returned."""
    outcome: list[RelayEnd] = []

    async def run() -> None:
        outcome.append(await r.relay(pump, **options))

    nursery.start_soon(run)
    return outcome


@asynccontextmanager
async def plain_upstream() -> AsyncIterator[tuple[trio.SocketStream, PlainSocketStream]]:
    """Another app connection: (the app's end, the upstream to offer)."""
    app, tcp = await tcp_pair()
    upstream = plain_stream(tcp)
    try:
        yield app, upstream
    finally:
        await trio.aclose_forcefully(app)
        await trio.aclose_forcefully(upstream)


async def test_renewing_ahead_it_switches_upstreams_at_a_boundary_without_stopping(
    contexts: Contexts, pump: NativePump
) -> None:
    async with (
        plain_upstream() as (next_app, next_up),
        rig(contexts) as r,
        trio.open_nursery() as nursery,
    ):
        renewals = Renewals([next_up], r)
        outcome = start_relay(nursery, r, pump, max_requests=2, renewal=renewals)
        await exchange(r.caller, r.app, b"/1", ADD)
        await exchange(r.caller, r.app, b"/2", ADD)  # the block is over: Python chooses
        await wait_for(lambda: renewals.offered == [True])
        await exchange(r.caller, next_app, b"/3", NEXT_ADD)  # the next one, its lines
        await exchange(r.caller, next_app, b"/4", NEXT_ADD)
        await r.caller.aclose()
    # the relay never stopped; the first upstream came back, reusable, after its two
    # exchanges were recorded; the next block's due came after two more (nothing offered)
    assert outcome[0].outcome is RelayOutcome.CLOSED and outcome[0].upstream_reusable
    assert renewals.switched_after == [2] and renewals.reusable == [True]
    assert renewals.upstreams == []
    assert [record[5] for record in r.records] == ["/1", "/2", "/3", "/4"]


async def test_renewing_ahead_none_offered_ends_it_at_the_next_boundary(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        renewals = Renewals([None], r)
        outcome = start_relay(nursery, r, pump, max_requests=1, renewal=renewals)
        await exchange(r.caller, r.app, b"/1", ADD)
        await wait_for(lambda: outcome)
    assert outcome[0].outcome is RelayOutcome.RENEW and outcome[0].upstream_reusable
    assert renewals.offered == [True] and renewals.switched_after == []


async def test_renewing_ahead_an_upstream_offered_and_not_used_stays_the_caller_s(
    contexts: Contexts, pump: NativePump
) -> None:
    async with plain_upstream() as (next_app, next_up):
        async with rig(contexts) as r, trio.open_nursery() as nursery:
            renewals = Renewals([next_up], r)
            outcome = start_relay(nursery, r, pump, max_requests=1, renewal=renewals)
            await exchange(r.caller, r.app, b"/1", ADD)
            await wait_for(lambda: renewals.offered == [True])
            await r.caller.aclose()  # before another request: no switch
        assert outcome[0].outcome is RelayOutcome.CLOSED and renewals.switched_after == []
        await next_up.send_all(b"still mine")  # the engine let it go untouched
        assert await read_until(next_app, b"still mine") == b"still mine"


async def test_renewing_ahead_the_block_s_time_is_said_while_it_waits_for_a_request(
    contexts: Contexts, pump: NativePump
) -> None:
    async with (
        plain_upstream() as (next_app, next_up),
        rig(contexts) as r,
        trio.open_nursery() as nursery,
    ):
        renewals = Renewals([next_up], r)
        start_relay(nursery, r, pump, max_seconds=0.2, hold=5, renewal=renewals)
        await exchange(r.caller, r.app, b"/1", ADD)
        # no request comes: the relay wakes at the block's end for Python to choose,
        # so the next request goes to the next upstream, with no wait
        await wait_for(lambda: renewals.offered == [True])
        await exchange(r.caller, next_app, b"/2", NEXT_ADD)
        await wait_for(lambda: renewals.switched_after == [1])
        await wait_for(lambda: renewals.settled == 1)  # the relay's task gives it back
        nursery.cancel_scope.cancel()


async def test_renewing_ahead_a_new_tls_upstream_s_first_read_is_reported(
    contexts: Contexts, pump: NativePump
) -> None:
    """The first upstream needs no first read (pooled), the next one does (a new TLS
    connection: its session ticket comes with its first bytes)."""
    first_reads: list[int] = []
    async with (
        tls_pair(contexts) as (next_app, next_up),
        rig(contexts) as r,
        trio.open_nursery() as nursery,
    ):
        renewals = Renewals([next_up], r, notify_first=True)
        nursery.start_soon(functools.partial(
            r.relay, pump, max_requests=1, renewal=renewals, notify_first=False,
            on_first_read=lambda: first_reads.append(len(r.records)),
        ))
        await exchange(r.caller, r.app, b"/1", ADD)  # no report: not asked for
        await wait_for(lambda: renewals.offered == [True])
        await exchange(r.caller, next_app, b"/2", NEXT_ADD)
        await wait_for(lambda: first_reads)
        assert first_reads == [1] and renewals.switched_after == [1]
        nursery.cancel_scope.cancel()


async def test_an_outbound_s_sessions_end_the_relay_when_its_next_upstream_is_refused(
    contexts: Contexts, pump: NativePump
) -> None:
    """http_proxy's side of renewing (``_Sessions``): a next upstream the engine will not
    take (here the one in use) goes back to its pool, and the relay ends at the next
    boundary (RENEW) so that the connection chooses again."""
    released: list[tuple[str, bool]] = []

    def session(name: str, upstream: PlainSocketStream) -> RelaySession:
        def release(reusable: bool) -> None:
            released.append((name, reusable))

        return RelaySession(upstream, release, {"endpoint": name}, ADD)

    async with rig(contexts) as r, trio.open_nursery() as nursery:

        async def start(current: RelaySession | None, *, connect: bool = True) -> RelaySession:
            return session("again", r.up)  # its descriptor is the current upstream's

        sessions = _Sessions(Relay(start, max_requests=1), session("first", r.up))
        outcome = start_relay(nursery, r, pump, max_requests=1, renewal=sessions)
        await exchange(r.caller, r.app, b"/1", ADD)
        await wait_for(lambda: outcome)
    assert outcome[0].outcome is RelayOutcome.RENEW
    assert released == [("again", True)] and sessions.current.labels == {"endpoint": "first"}


async def test_an_outbound_s_sessions_keep_an_upstream_chosen_again(
    contexts: Contexts, pump: NativePump
) -> None:
    """A renewal that comes to the choice in use (``start`` returns the current
    session) keeps it: block after block on the same upstream (each block ends and is
    renewed again), nothing switched, nothing handed back."""
    released: list[tuple[str, bool]] = []
    asked: list[RelaySession | None] = []

    def release(reusable: bool) -> None:
        released.append(("first", reusable))

    async with rig(contexts) as r, trio.open_nursery() as nursery:
        first = RelaySession(r.up, release, {"endpoint": "first"}, ADD)

        async def start(
            current: RelaySession | None, *, connect: bool = True
        ) -> RelaySession | None:
            asked.append(current)
            return current

        sessions = _Sessions(Relay(start, max_requests=1), first)
        outcome = start_relay(nursery, r, pump, max_requests=1, renewal=sessions)
        for n in range(4):
            await exchange(r.caller, r.app, b"/%d" % n, ADD)
            await wait_for(lambda n=n: len(asked) > n)  # the block is over: chosen again
        assert sessions.current is first and sessions.offered is None
        assert not outcome  # still relaying
        nursery.cancel_scope.cancel()
    assert asked == [first] * 4
    assert released == []


async def test_relay_next_takes_one_next_upstream_and_only_renewing_ahead(
    contexts: Contexts, pump: NativePump
) -> None:
    next_app, next_tcp = await tcp_pair()
    next_up = plain_stream(next_tcp)
    engine = pump._engine
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(r.relay, pump))
        await wait_for(lambda: pump._waiters)
        (plain,) = pump._waiters
        with pytest.raises(ValueError, match="not started with renew_ahead"):
            engine.relay_next(plain, None)
        with pytest.raises(ValueError, match="not started with renew_ahead"):
            engine.relay_keep(plain)
        nursery.cancel_scope.cancel()
    assert engine.relay_next(plain, None) is False  # ended: nothing taken
    assert engine.relay_keep(plain) is False
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        renewals = Renewals([], r)
        nursery.start_soon(functools.partial(r.relay, pump, max_requests=5, renewal=renewals))
        await wait_for(lambda: pump._waiters)
        (ahead,) = pump._waiters
        with pytest.raises(ValueError, match="a descriptor of its own"):
            engine.relay_next(ahead, stream_end(r.up))
        with pytest.raises(ValueError, match="field lines"):
            engine.relay_next(ahead, stream_end(next_up), add=b"no crlf")
        assert engine.relay_next(ahead, stream_end(next_up)) is True
        with pytest.raises(ValueError, match="already"):
            engine.relay_next(ahead, None)
        nursery.cancel_scope.cancel()
    await trio.aclose_forcefully(next_app)
    await trio.aclose_forcefully(next_up)


async def test_its_buffers_grow_to_a_request_of_64_kib_and_a_head_of_16(
    contexts: Contexts, pump: NativePump
) -> None:
    body = os.urandom(60_000)  # the buffers start at 4 KiB (requests) and 2 KiB (heads)
    cookie = b"Set-Cookie: " + b"c" * 12_000
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(r.relay, pump))
        await r.caller.send_all(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 60000\r\n\r\n" + body)
        seen = await read_until(r.app, body[-100:])
        assert seen.endswith(b"\r\n\r\n" + body)
        await r.app.send_all(ok(b"done", cookie))
        assert await read_until(r.caller, b"done") == ok(b"done", cookie)
        await r.caller.aclose()  # the relay ends (its records first)
    assert [(rec[0], rec[1]) for rec in r.records] == [(200, 60_000)]


async def test_a_relay_renews_after_max_seconds_before_the_next_request(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        outcome: list[RelayEnd] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                outcome.append(await r.relay(pump, max_seconds=0.3))

            nursery.start_soon(run)
            await r.caller.send_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
            await read_until(r.app, b"\r\n\r\n")
            await r.app.send_all(ok(b"1"))
            await read_until(r.caller, ok(b"1"))
            await trio.sleep(0.4)  # past max_seconds, within the hold
            await r.caller.send_all(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        # /2 is not read: the caller chooses again, and the next relay serves it
        assert outcome[0].outcome is RelayOutcome.RENEW and outcome[0].downstream == b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(r.relay, pump))
            assert await read_until(r.app, b"\r\n\r\n") == (
                b"GET /2 HTTP/1.1\r\nHost: h\r\n" + ADD + b"\r\n"
            )
            nursery.cancel_scope.cancel()


async def test_an_upstream_silent_for_the_idle_time_is_python_s_502_or_a_cut(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r:
        await r.caller.send_all(b"GET /silent HTTP/1.1\r\nHost: h\r\n\r\n")
        with trio.fail_after(5):
            end = await r.relay(pump, idle=0.3)  # the app reads the request, says nothing
        assert end.outcome is RelayOutcome.RESPONSE
        assert end.upstream_error == "no byte moved for 0.3s before the response"
    async with rig(contexts) as r:
        await r.caller.send_all(b"GET /stall HTTP/1.1\r\nHost: h\r\n\r\n")
        async with trio.open_nursery() as nursery:

            async def stall() -> None:
                await read_until(r.app, b"\r\n\r\n")
                await r.app.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

            nursery.start_soon(stall)
            with trio.fail_after(5), pytest.raises(trio.BrokenResourceError, match="no byte"):
                await r.relay(pump, idle=0.3)
        assert [(rec[0], rec[2]) for rec in r.records] == [(502, 3)]


# -- reconnect: an app with keep-alive off, connected again by the relay itself ------


async def ended(ends: list[RelayEnd]) -> bool:
    return bool(ends)


async def serve_first_then_close(r: Rig, body: bytes) -> None:
    """The rig's app answers the first request and closes, as with keep-alive off."""
    await read_until(r.app, b"\r\n\r\n")
    await r.app.send_all(ok(body, b"Connection: close"))
    await r.app.aclose()


async def app_listener(
    nursery: trio.Nursery, keep: bool = False
) -> tuple[int, list[trio.SocketStream]]:
    """An app on a free port that answers every request, closing after each unless
    ``keep``; returns the port and its connections, as they come."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    accepted: list[trio.SocketStream] = []

    async def serve(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        async with stream:
            while True:
                try:
                    await read_until(stream, b"\r\n\r\n")
                except AssertionError:  # the agent closed it
                    return
                await stream.send_all(ok(b"again", *([] if keep else [b"Connection: close"])))
                if not keep:
                    return

    await nursery.start(trio.serve_listeners, serve, listeners)
    return listeners[0].socket.getsockname()[1], accepted


async def reconnecting(
    r: Rig, pump: NativePump, nursery: trio.Nursery, port: int, seconds: float = 5.0
) -> list[RelayEnd]:
    """Start the relay with reconnect to ``port`` in ``nursery``, and have the rig's app
    answer the first request and close; returns the list the relay's end goes to."""
    ends: list[RelayEnd] = []

    async def run() -> None:
        ends.append(await r.relay(pump, reconnect=("127.0.0.1", port, seconds)))

    nursery.start_soon(run)
    await r.caller.send_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
    await serve_first_then_close(r, b"one")
    # the app's close is hop-by-hop: the caller is not told, and keeps its connection
    assert await read_until(r.caller, b"one") == ok(b"one")
    return ends


def closed_port() -> int:
    """A loopback port nothing listens on (connects are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_reconnect_connects_the_app_again_as_each_next_request_begins(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        port, accepted = await app_listener(nursery)
        ends = await reconnecting(r, pump, nursery, port)
        for n in (2, 3):
            await r.caller.send_all(b"GET /%d HTTP/1.1\r\nHost: h\r\n\r\n" % n)
            assert await read_until(r.caller, b"again") == ok(b"again")
        assert len(accepted) == 2  # one connect per request, none ahead of one
        await r.caller.aclose()
        await wait_until(functools.partial(ended, ends), timeout=5)
        nursery.cancel_scope.cancel()
    end = ends[0]
    assert end.outcome is RelayOutcome.CLOSED
    # the last connection of its own was closed by the app: nothing to hand back
    assert (end.upstream_fd, end.upstream_reusable) == (-1, False)
    assert [record[0] for record in r.records] == [200, 200, 200]


async def test_reconnect_hands_a_connection_of_its_own_still_open_to_the_caller(
    contexts: Contexts, pump: NativePump
) -> None:
    async with rig(contexts) as r, trio.open_nursery() as nursery:
        port, accepted = await app_listener(nursery, keep=True)
        ends = await reconnecting(r, pump, nursery, port)
        await r.caller.send_all(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert await read_until(r.caller, b"again") == ok(b"again")
        await r.caller.aclose()
        await wait_until(functools.partial(ended, ends), timeout=5)
        end = ends[0]
        assert end.outcome is RelayOutcome.CLOSED and end.upstream_reusable
        assert end.upstream_fd >= 0
        # the caller's now: the app's kept connection, ready for another request
        sock = socket.socket(fileno=end.upstream_fd)
        sock.setblocking(False)
        kept = PlainSocketStream(sock)
        await kept.send_all(b"GET /3 HTTP/1.1\r\nHost: h\r\n\r\n")
        assert await read_until(kept, b"again") == ok(b"again")
        assert len(accepted) == 1
        await kept.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("why", ["refused", "timed out"])
async def test_a_reconnect_that_fails_hands_the_request_back_with_why(
    contexts: Contexts, pump: NativePump, why: str
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        if why == "refused":
            port = closed_port()
        else:
            port = await stack.enter_async_context(full_backlog())
        r = await stack.enter_async_context(rig(contexts))
        nxt = b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
        async with trio.open_nursery() as nursery:
            ends = await reconnecting(r, pump, nursery, port, 0.5)
            await r.caller.send_all(nxt)  # after the first answer: the relay waits for it
            await wait_until(functools.partial(ended, ends), timeout=5)
    end = ends[0]
    assert end.outcome is RelayOutcome.UPSTREAM_SPENT
    assert end.upstream_error == ("connection refused" if why == "refused" else "timed out")
    assert end.downstream == nxt  # the request, untouched, for Python to answer
    assert (end.upstream_fd, end.upstream_reusable) == (-1, False)


async def test_a_relay_taken_back_while_it_connects_closes_its_connection(
    contexts: Contexts, pump: NativePump
) -> None:
    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with full_backlog() as port, rig(contexts) as r, trio.open_nursery() as nursery:
        relaying = trio.CancelScope()

        async def run() -> None:
            with relaying:
                await r.relay(pump, reconnect=("127.0.0.1", port, 30.0))

        nursery.start_soon(run)
        await r.caller.send_all(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        await serve_first_then_close(r, b"one")
        await read_until(r.caller, b"one")
        before = descriptors()
        await r.caller.send_all(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")

        async def connecting() -> bool:  # the relay's own socket, its connect hanging
            return descriptors() == before + 1

        async def released() -> bool:
            return descriptors() == before

        await wait_until(connecting, timeout=5)
        relaying.cancel()  # the relay's task: Engine.remove
        await wait_until(released, timeout=5)


async def test_reconnect_takes_an_ip_address_and_a_plain_upstream(
    contexts: Contexts, pump: NativePump
) -> None:
    for reconnect in [("localhost", 80, 1.0), ("127.0.0.1", 0, 1.0), ("127.0.0.1", 80, 0.0)]:
        async with rig(contexts) as r:
            with pytest.raises(NativeRefused):
                await r.relay(pump, reconnect=reconnect)
