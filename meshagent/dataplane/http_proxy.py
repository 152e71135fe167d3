"""The HTTP/1.1 proxy shell: drives ``protocol.http1`` over trio streams.

One downstream connection carries requests one after another (keep-alive; pipelined
requests are answered in order because each is finished before the next is read).
For each request a ``Decide`` callback says where it goes: ``Forward`` (an upstream
connection from a pool, the rewritten head) or ``Respond`` (an answer made here: 404
no route, 503 no endpoint). Then:

* the request head goes up; its body is streamed (re-chunked when it was chunked)
  while the response is read, in a nursery that exists only for requests with a body
  (so an upstream that answers early, e.g. 413, is not deadlocked);
* the response is streamed down; an until-close body is re-chunked for HTTP/1.1
  clients, so the downstream connection can stay open;
* a 101 (WebSocket) turns both connections into a tunnel, leftover bytes included
  (in the C pump when there is one);
* with the C pump (``serve_http(pump=...)``), big Content-Length bodies move in C
  (``NATIVE_BODY_BYTES`` or more still to come): a response body once its first bytes
  came through Python and the request was sent whole; a request body (no ``Expect:
  100-continue``) before the response is read, until the upstream answers (an early
  413), after which Python streams the rest while it relays the answer. Either way
  nothing else uses the two connections while the pump has them;
* the upstream goes back to the pool when both messages ended cleanly and both sides
  allow keep-alive; otherwise it is closed. The client's connection stays open when
  the client allows it and can tell where the body ended, whatever the upstream said
  (its ``Connection: close`` is hop-by-hop): an app that closes after every answer
  costs an app connection per request, not the client's (nor the mesh's) connection;
* with ``relay`` as well (the inbound), plain requests are served by the C pump's HTTP
  relay (``NativePump.relay``) from a request boundary, with no Python per request;
  what it does not take it hands back with every byte it read, and this module serves
  it as above (``_Relaying``).

Limits and errors: a bad request gets the status the parser says (400/413/414/431/
501/505) and the connection closes; a head that does not complete within
``HEAD_SECONDS`` gets 408; an upstream that breaks before answering gives 502; one
that breaks in the middle of a response cuts the downstream connection (the status
line is gone already). Bodies are never held whole: one chunk at a time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from meshagent.dataplane.connection import LATENCY_BUCKETS_SECONDS, Drain, HttpStats, describe
from meshagent.dataplane.errors import (
    DOWNSTREAM,
    UPSTREAM,
    ConnectionBroken,
    DataplaneError,
    broken_at,
)
from meshagent.dataplane.nativepump import (
    KEEP,
    End,
    NativePump,
    NativeRefused,
    Offer,
    Record,
    RelayEnd,
    RelayOutcome,
    Summary,
    log_refusal,
    stream_end,
)
from meshagent.dataplane.sslsocket import SslSocketStream
from meshagent.log import get_logger
from meshagent.protocol.headers import (
    Headers,
    get_header,
    remove_headers,
    set_header,
    strip_hop_by_hop,
)
from meshagent.protocol.http1 import (
    Body,
    EndOfMessage,
    Event,
    Framing,
    HttpError,
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
from meshagent.routing.retry import RetryBudget, RetryRule, backoff_seconds

log = get_logger("http")
access_log = get_logger("access")

CHUNK = 64 * 1024
_RNG = random.Random()
HEAD_SECONDS = 30.0  # from a request's first byte to the end of its head (else 408)
# A request body up to this size is read whole before the first try when the request may
# be retried (a PUT, or a POST on a route that retries any method), so a retry can send it
# again; bigger ones stream through and are not retried.
RETRY_BODY_BYTES = 64 * 1024
# The rest of a Content-Length body (request or response) at least this big is moved by
# the C pump (NativePump.copy) instead of chunk by chunk through Python: handing the two
# sockets over costs about as much as relaying a few chunks.
NATIVE_BODY_BYTES = 256 * 1024
_BODY_REFUSED = "l4 pump refused an HTTP body; relaying it in Python (logged once)"
_TUNNEL_REFUSED = "l4 pump refused an upgraded connection; pumping it in Python (logged once)"
_RELAY_REFUSED = "l4 pump refused an HTTP connection; serving it in Python (logged once)"
# The C relay gives its upstream back to the pool after this long without a request, so
# an idle client does not hold an app connection (Python waits for its next request).
RELAY_HOLD_SECONDS = 1.0
# What Python reads of a next request before the relay takes it (its first buffer's size).
_NEXT_BYTES = 4096

Stream = trio.abc.Stream


class _Reader:
    """Events from one stream through one parser, read on demand."""

    __slots__ = ("_parser", "_pending", "end", "eof", "stream")

    def __init__(
        self,
        stream: Stream,
        parser: RequestParser | ResponseParser,
        prefix: bytes = b"",
        end: str | None = None,
    ) -> None:
        self.stream = stream
        self.end = end  # given: a failed read is a ConnectionBroken naming this end
        self._parser = parser
        # A list, not a deque: a deque's first block (about 0.6 KiB) would stay with
        # every idle keep-alive connection; a read gives a few events at most.
        self._pending: list[Event] = []
        self.eof = False
        if prefix:
            try:
                self._feed(prefix)
            except HttpError as exc:  # raised by the next read, with nothing read
                self._parser = _Failed(exc)  # type: ignore[assignment]

    @classmethod
    def requests(cls, downstream: Stream, prefix: bytes = b"") -> _Reader:
        """A reader of the requests a client sends (``prefix``: read already)."""
        return cls(downstream, RequestParser(), prefix, DOWNSTREAM)

    def has_pending(self) -> bool:
        return bool(self._pending)

    def at_rest(self) -> bool:
        """Between requests with nothing read ahead: the C relay may take over."""
        parser = self._parser
        return (
            not self._pending
            and not self.eof
            and isinstance(parser, RequestParser)
            and parser.at_rest
        )

    async def next_event(self) -> Event | None:
        """The next event, or None at end of stream. A cancel point.

        Raises:
            HttpError: the peer broke HTTP (events before the error are returned first).
        """
        while not self._pending:
            if self.eof:
                return None
            await self.receive()
        return self._pending.pop(0)

    async def wait_for_bytes(self) -> None:
        """Return once the next request has begun to arrive (or the stream ended): the
        wait between keep-alive requests, which has no deadline of its own. Bytes of it
        read already (a part of a head) end the wait: the head's deadline runs then."""
        if not self._pending and not self.eof and self.at_rest():
            await self.receive()

    async def receive(self) -> None:
        """Read once from the stream into the parser (events may or may not result)."""
        if isinstance(self._parser, _Failed):  # the bytes so far broke HTTP already
            raise self._parser.error
        try:
            data = await self.stream.receive_some(CHUNK)
        except (trio.BrokenResourceError, OSError) as exc:
            if self.end is None or isinstance(exc, ConnectionBroken):
                raise
            raise ConnectionBroken(describe(exc), self.end) from exc
        self._feed(data)

    def _feed(self, data: bytes | bytearray) -> None:
        """Bytes read (``b""``: the end of the stream) into the parser."""
        try:
            if data:
                self._pending.extend(self._parser.feed(bytes(data)))
            else:
                self.eof = True
                self._pending.extend(self._parser.feed_eof())
        except HttpError as exc:
            if not exc.events:
                raise
            self._pending.extend(exc.events)
            self._parser = _Failed(exc)  # type: ignore[assignment]

    def push_front(self, events: list[Event]) -> None:
        self._pending[:0] = events

    @property
    def parser(self) -> RequestParser | ResponseParser:
        return self._parser


class _Failed:
    """Stands in for a parser that failed after returning some events."""

    def __init__(self, error: HttpError) -> None:
        self.error = error

    def feed(self, data: bytes) -> list[Event]:
        raise self.error

    def feed_eof(self) -> list[Event]:
        raise self.error


# release(reusable): gives a request's upstream back (to its pool, or closed when not
# reusable). Not async: it never waits, so cleanup paths call it without a shielded scope.
Release = Callable[[bool], None]


@dataclass(slots=True)
class Forward:
    """Send the request to ``upstream``; ``release(reusable)`` hands it back afterwards."""

    upstream: trio.abc.Stream
    release: Release
    target: bytes
    headers: Headers
    response_headers: Headers = ()  # added to the response (e.g. Set-Cookie)
    labels: dict[str, str] = field(default_factory=dict)  # for the access log
    key: Hashable = None  # the endpoint, so that a retry can go elsewhere
    retry: RetryRule | None = None
    budget: RetryBudget | None = None
    rng: random.Random | None = None  # for backoff jitter; None: a shared one
    request_seconds: float | None = None  # the whole request, retries included (504)
    per_try_seconds: float | None = None
    resumed: RelayEnd | None = None  # the C relay sent the request; relay its response


@dataclass(frozen=True, slots=True)
class RelaySession:
    """Where the C relay sends requests until it ends: an upstream (``release`` hands
    it back), the labels its requests are counted and logged with, the field lines
    added to each, and what was chosen (``choice``: an outbound's endpoint), which
    tells a renewal that chose the same (``Relay``)."""

    upstream: Stream
    release: Release
    labels: dict[str, str]
    add: bytes = b""
    choice: Hashable | None = None

    def same(self, choice: Hashable, labels: dict[str, str], add: bytes) -> bool:
        """Whether a new choice would send requests where this session does."""
        return self.choice == choice and self.labels == labels and self.add == add


@dataclass(frozen=True, slots=True)
class Relay:
    """Lets the C pump's HTTP relay serve a connection's plain requests (see
    ``NativePump.relay``). At each request boundary ``start`` says where the next
    requests go (None: not now, Python serves the next one); the relay forwards each
    with the hop-by-hop fields and those named in ``drop`` removed, ids added when
    ``gen_ids`` and the session's lines added: what ``decide`` would make of it (the
    caller keeps the two true to each other). Requests with a field named in
    ``refuse``, and whatever else the relay does not take, are served in Python
    through ``decide``. With ``max_requests`` or ``max_seconds`` (0: no limit), those
    bound a block of requests on one session: at a block's end the relay goes on while
    ``start`` is asked again, and switches to the new session at the next request (see
    ``nativepump.Renewal``), so a per-request choice (weights, balancing, the snapshot
    in force) is made again that often. ``start`` is given the session in use (None at
    first): returning it means the choice came out the same, and the relay keeps it
    for the next block, with nothing to switch or give back; ``on_records`` is told
    how many requests the relay served, batch by batch."""

    start: Start
    drop: tuple[bytes, ...] = ()
    refuse: tuple[bytes, ...] = ()
    gen_ids: bool = False
    max_requests: int = 0
    max_seconds: float = 0
    on_records: Callable[[int], None] | None = None
    reconnect: Reconnect | None = None


class Start(Protocol):
    """``Relay.start``. With ``connect`` False, only an idle pooled upstream will do
    (None when there is none): a request boundary with no bytes of the next request
    yet takes one of those at once, and connects only once the request begins."""

    def __call__(
        self, current: RelaySession | None, *, connect: bool = True
    ) -> Awaitable[RelaySession | None]: ...


class Reconnect(Protocol):
    """How the C relay connects a plain upstream again itself when an exchange leaves
    it closed (an app with keep-alive off: ``NativePump.relay``'s ``reconnect``), so a
    request costs a connect, not a relay started again from Python."""

    def address(self) -> tuple[str, int, float] | None:
        """(IP address, port, connect seconds), read at each relay's start; None: the
        relay ends when the upstream is spent, and ``start`` connects."""

    def adopt(self, fd: int, spent: RelaySession) -> RelaySession:
        """A session of the connection the relay opened (``fd``, the caller's now), in
        place of ``spent``, whose upstream the caller has closed."""

    def failed(self, why: str) -> None:
        """One of the relay's connects failed (``why``, as an OS error says it, or
        "timed out"): the request it was for goes to ``decide`` next, which answers it."""


# A connect of the relay's ``start`` that failed is the first try of the request
# ``decide`` is given next if decide comes this soon after: the request was there
# already (reading and parsing it takes far less). Later, it came after the failure,
# and decide tries afresh. Without this a request could connect twice to an endpoint
# that times out (once in start, once in decide) before its answer.
START_FAILURE_FRESH_SECONDS = 0.1


class StartFailure:
    """What the relay's ``start`` of one connection found when its own connect failed:
    recorded by start, taken by the next ``decide``."""

    __slots__ = ("_at", "_error", "_key")

    def __init__(self) -> None:
        self._at = -math.inf
        self._key: Hashable = None
        self._error: DataplaneError | None = None

    def record(self, key: Hashable, error: DataplaneError) -> None:
        self._at, self._key, self._error = trio.current_time(), key, error

    def clear(self) -> None:
        self._error = None

    def take(self) -> tuple[Hashable, DataplaneError] | None:
        """The failure recorded, if it is fresh; forgotten either way."""
        error, self._error = self._error, None
        if error is None or trio.current_time() - self._at > START_FAILURE_FRESH_SECONDS:
            return None
        return self._key, error


@dataclass(slots=True)
class Respond:
    """Answer here, without an upstream."""

    status: int
    text: str
    labels: dict[str, str] = field(default_factory=dict)
    close: bool = False  # close the connection after this answer


# decide(head, tried): where the request goes; ``tried`` holds the keys (endpoints) of
# earlier tries of the same request, so that a retry goes elsewhere when it can.
Decide = Callable[[RequestHead, tuple[Hashable, ...]], Awaitable[Forward | Respond]]


class UpstreamBroke(Exception):
    """The upstream failed before its response head arrived (answer 502)."""


async def serve_http(
    downstream: Stream,
    decide: Decide,
    *,
    idle_seconds: float,
    log_fields: dict[str, object],
    prefix: bytes = b"",
    head_seconds: float = HEAD_SECONDS,
    stats: HttpStats | None = None,
    drain: Drain | None = None,
    listener: str = "",
    pump: NativePump | None = None,
    relay: Relay | None = None,
) -> None:
    """Serve requests from ``downstream`` until it closes, idles out, breaks HTTP or the
    agent drains (between requests: at once; during one: after it). A cancel point;
    closes nothing it did not open (the caller closes ``downstream``). Between requests
    it waits under ``drain.idle`` for ``listener``: a drain, or the listener at its
    connection limit, closes it then. With ``pump``, big bodies move in C, and with
    ``relay`` too, plain requests are served by the C relay (see the module
    docstring)."""
    reader = _Reader.requests(downstream, prefix)
    native = None if pump is None else _Native(pump, idle_seconds)
    drain = drain or Drain()
    relaying = None
    if relay is not None and pump is not None:
        relaying = _Relaying(
            relay, pump, idle_seconds, head_seconds, drain, listener, stats, log_fields
        )
    while True:
        if drain.started:
            return
        resume: Forward | None = None
        this_decide = decide
        if relaying is not None and reader.at_rest():
            handoff = await relaying.serve(downstream)
            if handoff is None:
                return
            reader, resume = handoff
        try:
            if resume is None:
                with trio.move_on_after(idle_seconds) as waiting, drain.idle(waiting, listener):
                    await reader.wait_for_bytes()
                if waiting.cancelled_caught:
                    return  # idle for idle_seconds, the agent drains, or the listener is full
            first = await _next_head(reader, head_seconds)
            if resume is not None:
                assert first is not None  # the relay sent it whole
                this_decide = _resumed(resume, first)
                resume = None
        except trio.BrokenResourceError:
            # Dropped between requests (an idle pooled connection whose peer went
            # away without a TLS close): a normal end of keep-alive, not a failure.
            return
        except trio.TooSlowError:
            text = f"the request head did not arrive within {head_seconds}s"
            await _send_quietly(downstream, error_response(408, text))
            log.info("request timeout", status=408, **log_fields)
            return
        except HttpError as exc:
            await _send_quietly(downstream, error_response(exc.status, exc.reason))
            log.info("bad request", status=exc.status, reason=exc.reason, **log_fields)
            return
        finally:
            if resume is not None:  # the relay's exchange, not reached: its upstream goes
                resume.release(False)
        if first is None:
            return
        keep = await _one_request(
            reader, downstream, first, this_decide, log_fields, stats, native
        )
        if not keep:
            return


@dataclass(slots=True)
class _Relaying:
    """The C relay's side of ``serve_http``: it serves requests while the relay takes
    them, and says what Python goes on with."""

    relay: Relay
    pump: NativePump
    idle_seconds: float
    head_seconds: float
    drain: Drain
    listener: str
    stats: HttpStats | None
    log_fields: dict[str, object]
    access_fields: dict[str, object] = field(init=False)

    def __post_init__(self) -> None:
        self.access_fields = {**self.log_fields, "attempts": 1}

    def records(
        self, labels: dict[str, str], batch: list[Record], summaries: list[Summary]
    ) -> None:
        """Exchanges the relay finished: metrics and access log, as Python's own."""
        count = len(batch)
        if self.stats is not None and batch:
            self.stats.record_many(labels, [(record[0], record[3]) for record in batch])
        for classes, first_bucket, served, total in summaries:
            if self.stats is not None:
                self.stats.record_summary(labels, classes, first_bucket, total)
            count += served
        if self.relay.on_records is not None:
            self.relay.on_records(count)
        if not batch or not access_log.enabled("info"):
            return
        for status, sent, received, seconds, method, path, request_id in batch:
            fields = labels
            if request_id is not None:
                fields = {**labels, "request_id": request_id.decode("latin-1")}
            _access(method, path, status, sent, received, seconds, fields, self.access_fields)

    async def serve(self, downstream: Stream) -> tuple[_Reader, Forward | None] | None:
        """Relay requests from a request boundary. Returns None when the connection is
        done; else the reader Python serves the next request from, and, when the relay
        handed an exchange back after its request went up, that exchange (its
        ``Forward.resumed`` set; its upstream is the caller's to release)."""
        relay, initial, ahead = self.relay, b"", True
        while True:
            down_end = stream_end(downstream)
            session = None
            if down_end is not None and not initial and ahead:
                # The next request is likely on its way (a new connection, or one whose
                # last request Python served): an idle pooled upstream is taken now.
                session = await relay.start(None, connect=False)
            if session is None:
                if not initial:
                    # A new connection (to the other agent, or to an app with keep-alive
                    # off) waits for the request: an idle caller would hold one, or with
                    # a hung app a connect slot, for no request.
                    initial = await self._next_bytes(downstream)
                    if not initial:
                        return None  # closed, drained, or idle for good
                if down_end is not None:
                    session = await relay.start(None)
            ahead = True
            if down_end is None or session is None:
                return _Reader.requests(downstream, initial), None
            up_end = stream_end(session.upstream)
            sessions = _Sessions(relay, session)
            try:
                if up_end is None:
                    raise NativeRefused("the upstream cannot be pumped")
                end = await self._relay(down_end, up_end, sessions, initial)
            except NativeRefused as exc:  # nothing moved, no switch
                log_refusal(_RELAY_REFUSED, str(exc))
                session.release(True)
                return _Reader.requests(downstream, initial), None
            except BaseException:
                sessions.current.release(False)
                sessions.close()
                raise
            sessions.close()
            session = sessions.current  # the one in use at the end
            if end.upstream_fd >= 0:  # the relay connected the app again itself
                assert relay.reconnect is not None
                session.release(False)  # the one the app closed
                session = relay.reconnect.adopt(end.upstream_fd, session)
            upstream, release = session.upstream, session.release
            outcome = end.outcome
            if outcome is RelayOutcome.RESPONSE:  # the request went up: Python relays the answer
                resumed = Forward(
                    upstream, release, b"", (), labels=session.labels, resumed=end
                )
                return _Reader.requests(downstream, end.downstream), resumed
            release(end.upstream_reusable)
            if outcome is RelayOutcome.REQUEST:  # one the relay does not take
                return _Reader.requests(downstream, end.downstream), None
            if outcome is RelayOutcome.UPSTREAM_SPENT and end.upstream_error is not None:
                assert relay.reconnect is not None  # its connect failed: decide answers
                relay.reconnect.failed(end.upstream_error)
                return _Reader.requests(downstream, end.downstream), None
            if outcome in (RelayOutcome.UPSTREAM_SPENT, RelayOutcome.RENEW):
                # the next request (its first bytes, if any came): another upstream, or
                # decision; an upstream that closed (an app answering Connection: close)
                # is connected again once that request begins
                initial = end.downstream
                continue
            if outcome is RelayOutcome.HEAD_TIMEOUT:
                text = f"the request head did not arrive within {self.head_seconds}s"
                await _send_quietly(downstream, error_response(408, text))
                log.info("request timeout", status=408, **self.log_fields)
                return None
            if outcome is not RelayOutcome.IDLE:
                return None  # closed, drained, or Connection: close
            # Idle through the relay's hold: wait on without an upstream (one taken
            # again at once would be held for nothing, hold after hold).
            initial, ahead = b"", False

    async def _relay(
        self, down_end: End, up_end: End, sessions: _Sessions, initial: bytes
    ) -> RelayEnd:
        relay = self.relay
        renews = relay.max_requests > 0 or relay.max_seconds > 0
        first = sessions.current.upstream
        return await self.pump.relay(
            down_end,
            up_end,
            idle_seconds=self.idle_seconds,
            hold_seconds=min(RELAY_HOLD_SECONDS, self.idle_seconds),
            head_seconds=self.head_seconds,
            drop=relay.drop,
            add=sessions.current.add,
            on_records=lambda batch, summaries: self.records(
                sessions.current.labels, batch, summaries
            ),
            stop_when=functools.partial(self.drain.idle, listener=self.listener),
            initial=initial,
            refuse=relay.refuse,
            gen_ids=relay.gen_ids,
            max_requests=relay.max_requests,
            max_seconds=relay.max_seconds,
            # an upstream offered later may need it where the first does not
            on_first_read=sessions.first_read,
            notify_first=_first_read(first) is not None,
            # one by one only for the access log (read at each run's start)
            summary=None if access_log.enabled("info") else LATENCY_BUCKETS_SECONDS,
            renewal=sessions if renews else None,
            reconnect=None if relay.reconnect is None else relay.reconnect.address(),
        )

    async def _next_bytes(self, downstream: Stream) -> bytes:
        """The next request's first bytes, waited for as long as the connection's idle
        time; b"" when none came (or the caller closed or broke the connection, a drain
        began, or the listener reached its connection limit meanwhile)."""
        with trio.move_on_after(self.idle_seconds) as waiting, self.drain.idle(
            waiting, self.listener
        ):
            try:
                return bytes(await downstream.receive_some(_NEXT_BYTES))
            except trio.BrokenResourceError:  # as the relay's CLOSED: a caller's end
                return b""
        return b""


class _Sessions:
    """The upstreams of one run of an outbound's relay (``nativepump.Renewal``): the one
    in use (``current``: its labels go with the records), the one offered for the next
    block, and those handed back, to give back to their pools."""

    def __init__(self, relay: Relay, current: RelaySession) -> None:
        self.relay = relay
        self.current = current
        self.offered: RelaySession | None = None
        self.retired: list[tuple[Release, bool]] = []

    async def renew(self, offer: Offer) -> None:
        session = await self.relay.start(self.current)
        if session is self.current:  # the same choice: no switch, nothing to give back
            if not offer(KEEP, b"", False):
                offer(None, b"", False)  # refused, or ended meanwhile (then a no-op)
            return
        end = None if session is None else stream_end(session.upstream)
        if session is not None and end is None:
            self.retired.append((session.release, True))
            session = None
        if session is None:  # the route wants Python now: the relay ends at a boundary
            offer(None, b"", False)
        else:
            self.offered = session
            if not offer(end, session.add, _first_read(session.upstream) is not None):
                # ended meanwhile, or refused (then end at a boundary, and choose again)
                self.offered = None
                self.retired.append((session.release, True))
                offer(None, b"", False)
        self.settle()

    def switched(self, reusable: bool) -> None:
        assert self.offered is not None, "the relay switched to an upstream never offered"
        self.retired.append((self.current.release, reusable))
        self.current, self.offered = self.offered, None

    def settle(self) -> None:
        while self.retired:
            release, reusable = self.retired.pop()
            release(reusable)

    def close(self) -> None:
        """After the relay's end: the upstream offered and not switched to goes back."""
        if self.offered is not None:
            self.retired.append((self.offered.release, True))
            self.offered = None
        self.settle()

    def first_read(self) -> None:
        call = _first_read(self.current.upstream)
        if call is not None:
            call()


def _first_read(stream: Stream) -> Callable[[], None] | None:
    """What to call once a new TLS client connection's first bytes came (its session
    is offered for resumption then), or None when nothing waits for them."""
    if isinstance(stream, SslSocketStream) and stream.wants_first_read:
        return stream.first_read
    return None


def _resumed(resume: Forward, head: RequestHead) -> Decide:
    """The decision for an exchange the C relay handed back (its request already sent)."""
    labels = resume.labels
    assert resume.resumed is not None
    request_id = resume.resumed.request_id or get_header(head.headers, b"x-request-id")
    if request_id is not None:
        labels = {**labels, "request_id": request_id.decode("latin-1")}
    forward = dataclasses.replace(resume, target=head.target, headers=head.headers, labels=labels)

    async def decide(head: RequestHead, tried: tuple[Hashable, ...]) -> Forward | Respond:
        return forward

    return decide


async def _next_head(reader: _Reader, head_seconds: float) -> RequestHead | None:
    """The next request head, once its first bytes arrived (``wait_for_bytes``)."""
    with trio.fail_after(head_seconds):
        event = await reader.next_event()
    if event is None:
        return None
    if not isinstance(event, RequestHead):
        raise HttpError(400, f"expected a request, got {type(event).__name__}")
    return event


@dataclass(frozen=True, slots=True)
class _Native:
    """The C pump, for big bodies and tunnels; a body's copy fails after idle_seconds
    without a byte (the connection's idle limit)."""

    pump: NativePump
    idle_seconds: float


@dataclass(slots=True)
class _Progress:
    bytes_up: int = 0
    bytes_down: int = 0
    head_down: bool = False  # a response head went to the client: no retry, no 504


async def _one_request(
    reader: _Reader,
    downstream: Stream,
    head: RequestHead,
    decide: Decide,
    log_fields: dict[str, object],
    stats: HttpStats | None = None,
    native: _Native | None = None,
) -> bool:
    """Proxy one request (retrying it when its policy allows); True if the downstream
    connection may carry another request."""
    started = time.monotonic()
    path = head.target.split(b"?", 1)[0].decode("latin-1")
    method = head.method.decode("latin-1")
    bodyless = head.body.framing is Framing.NONE
    if bodyless:
        await _end_of_bodyless(reader)
    decision = await decide(head, ())
    if isinstance(decision, Respond):
        keep = head.keep_alive and bodyless and not head.may_switch_protocols
        keep = keep and not decision.close
        with broken_at(DOWNSTREAM):
            await downstream.send_all(
                error_response(decision.status, decision.text, close=not keep)
            )
        seconds = time.monotonic() - started
        _access(method, path, decision.status, 0, 0, seconds, decision.labels, log_fields)
        if stats is not None:
            stats.record(decision.labels, decision.status, time.monotonic() - started)
        return keep
    progress = _Progress()
    status, keep, attempts = 502, False, 0
    labels = decision.labels
    overall = trio.CancelScope()
    if decision.request_seconds is not None:
        overall.deadline = trio.current_time() + decision.request_seconds
    tried: list[Hashable] = []
    # The whole request body, once read, so that every try can send it again.
    body: bytes | None = b"" if bodyless else None
    try:
        with overall:
            while True:
                attempts += 1
                fwd = decision
                labels = fwd.labels
                tried.append(fwd.key)
                reusable = False
                try:
                    if body is None and _may_hold_body(head, fwd):
                        body = await _read_body(reader, progress)
                    if body is not None and fwd.retry is not None:
                        outcome = await _try_whole(
                            downstream, head, body, fwd, reader, progress, native
                        )
                    else:
                        outcome = await _exchange(
                            reader, downstream, head, fwd, progress, native
                        )
                    if isinstance(outcome, _Done):
                        status, keep, reusable = outcome.status, outcome.keep, outcome.reusable
                        return keep
                finally:
                    fwd.release(reusable)
                # A retryable failure (outcome is _Failed_Try).
                retry = fwd.retry
                if (
                    retry is None
                    or not outcome.retryable
                    or progress.head_down
                    or attempts >= retry.attempts
                    or not retry.may_retry_method(head.method)
                    or fwd.budget is None
                    or not fwd.budget.try_spend(retry, trio.current_time())
                ):
                    status = outcome.status
                    await _send_quietly(downstream, error_response(status, outcome.text))
                    return False
                log.info(
                    "retrying", reason=outcome.text, attempt=attempts + 1, **labels, **log_fields
                )
                await trio.sleep(backoff_seconds(retry, attempts, fwd.rng or _RNG))
                next_decision = await decide(head, tuple(tried))
                if isinstance(next_decision, Respond):
                    status = outcome.status
                    await _send_quietly(downstream, error_response(status, outcome.text))
                    return False
                decision = next_decision
    except UpstreamBroke as exc:
        status = 502
        await _send_quietly(downstream, error_response(502, f"upstream failed: {exc}"))
        log.warning("upstream failed", error=str(exc), **labels, **log_fields)
        return False
    except HttpError as exc:
        if exc.status == 502 and not progress.head_down:  # the upstream broke HTTP
            status = 502
            await _send_quietly(downstream, error_response(502, exc.reason))
            return False
        # Too late to answer: the response (502: the upstream's parser's error) or the
        # request (the client's) broke inside its body.
        raise ConnectionBroken(exc.reason, UPSTREAM if exc.status == 502 else DOWNSTREAM) from exc
    finally:
        if overall.cancelled_caught and not progress.head_down:
            status = 504
            text = f"upstream did not answer within {decision.request_seconds}s"
            await _send_quietly(downstream, error_response(504, text))
        if stats is not None:
            stats.record(labels, status, time.monotonic() - started)
        _access(
            method,
            path,
            status,
            progress.bytes_up,
            progress.bytes_down,
            time.monotonic() - started,
            labels,
            {**log_fields, "attempts": attempts},
        )
    return False


@dataclass(slots=True)
class _Done:
    status: int
    keep: bool
    reusable: bool


@dataclass(slots=True)
class _FailedTry:
    status: int  # what the client gets if this is the last try
    text: str
    retryable: bool


async def _send_head(head: RequestHead, fwd: Forward) -> _Reader:
    headers = fwd.headers
    if head.body.framing is Framing.CHUNKED:
        headers = set_header(headers, b"Transfer-Encoding", b"chunked")
    parser = ResponseParser()
    parser.expect(head.method, upgrade=head.upgrade is not None)
    try:
        target_head = dataclasses.replace(head, target=fwd.target)
        await fwd.upstream.send_all(serialize_request_head(target_head, headers=headers))
    except (trio.BrokenResourceError, OSError) as exc:
        raise UpstreamBroke(describe(exc)) from None
    return _Reader(fwd.upstream, parser)


def _may_hold_body(head: RequestHead, fwd: Forward) -> bool:
    """Read the body before the first try, so a retry can send it again: a retryable
    method, a Content-Length of at most RETRY_BODY_BYTES, and no ``Expect: 100-continue``
    (that client waits for the upstream's 100) or upgrade. Other bodies stream through
    and their requests are not retried."""
    retry = fwd.retry
    return (
        retry is not None
        and retry.may_retry_method(head.method)
        and head.body.framing is Framing.CONTENT_LENGTH
        and (head.body.content_length or 0) <= RETRY_BODY_BYTES
        and not head.expect_continue
        and head.upgrade is None
    )


async def _read_body(reader: _Reader, progress: _Progress) -> bytes:
    """The rest of the request: its body, up to its end."""
    parts: list[bytes] = []
    while True:
        event = await reader.next_event()
        if event is None:
            raise HttpError(400, "the client closed the connection inside a request body")
        if isinstance(event, Body):
            progress.bytes_up += len(event.data)
            parts.append(event.data)
        elif isinstance(event, EndOfMessage):
            return b"".join(parts)


async def _try_whole(
    downstream: Stream,
    head: RequestHead,
    body: bytes,
    fwd: Forward,
    reader: _Reader,
    progress: _Progress,
    native: _Native | None,
) -> _Done | _FailedTry:
    """One try of a request whose body (maybe empty) was read whole: its response head
    is read under the per-try deadline before anything goes to the client, so the try
    can still be retried."""
    retry = fwd.retry
    assert retry is not None
    try:
        up = await _send_head(head, fwd)
        if body:
            try:
                await fwd.upstream.send_all(body)
            except (trio.BrokenResourceError, OSError) as exc:
                raise UpstreamBroke(describe(exc)) from None
        with trio.move_on_after(fwd.per_try_seconds or math.inf) as per_try:
            first = await _first_final_event(up, downstream, progress)
    except UpstreamBroke as exc:
        return _FailedTry(502, f"upstream failed: {exc}", retryable=retry.on_reset)
    if per_try.cancelled_caught:
        text = f"upstream did not answer within {fwd.per_try_seconds}s"
        return _FailedTry(504, text, retryable=retry.on_timeout)
    if isinstance(first, ResponseHead) and first.status in retry.statuses:
        return _FailedTry(first.status, f"upstream answered {first.status}", retryable=True)
    status, keep, reusable = await _relay_response(
        up, downstream, head, fwd, reader, progress, first=first, native=native
    )
    return _Done(status, keep and head.keep_alive, reusable)


async def _first_final_event(up: _Reader, downstream: Stream, progress: _Progress) -> Event:
    """Read to the first response head that is not informational (1xx are forwarded)."""
    while True:
        try:
            event = await up.next_event()
        except (trio.BrokenResourceError, OSError) as exc:
            raise UpstreamBroke(describe(exc)) from None
        if event is None:
            raise UpstreamBroke("connection closed before a response")
        if isinstance(event, ResponseHead) and event.is_informational and event.status != 101:
            with broken_at(DOWNSTREAM):
                await downstream.send_all(serialize_response_head(event, headers=event.headers))
            progress.head_down = True
            continue
        return event


async def _exchange(
    reader: _Reader,
    downstream: Stream,
    head: RequestHead,
    fwd: Forward,
    progress: _Progress,
    native: _Native | None,
) -> _Done:
    """Send the request (streaming its body) while relaying the response."""
    if fwd.resumed is not None:
        return await _finish_resumed(reader, downstream, head, fwd, fwd.resumed, progress, native)
    up = await _send_head(head, fwd)
    chunked_up = head.body.framing is Framing.CHUNKED
    request_done = trio.Event()

    async def send_body() -> None:
        while True:
            event = await reader.next_event()
            if event is None:
                raise HttpError(400, "the client closed the connection inside a request body")
            if isinstance(event, Body):
                progress.bytes_up += len(event.data)
                data = serialize_chunk(event.data) if chunked_up else event.data
                with broken_at(UPSTREAM):
                    await fwd.upstream.send_all(data)
            elif isinstance(event, EndOfMessage):
                if chunked_up:
                    with broken_at(UPSTREAM):
                        await fwd.upstream.send_all(serialize_last_chunk(event.trailers))
                request_done.set()
                return

    result: list[tuple[int, bool, bool]] = []

    async def relay() -> None:
        result.append(
            await _relay_response(
                up, downstream, head, fwd, reader, progress, native=native, sent=request_done
            )
        )

    if head.body.framing is Framing.NONE:
        request_done.set()
        await relay()
    else:
        if (
            native is not None
            and head.body.framing is Framing.CONTENT_LENGTH
            and not head.expect_continue
            and head.upgrade is None
        ):
            await _send_body_natively(reader, fwd.upstream, native, progress)
        async with trio.open_nursery() as both:
            both.start_soon(send_body)
            both.start_soon(relay)
    status, keep_down, keep_up = result[0]
    reusable = keep_up and request_done.is_set() and not up.has_pending()
    return _Done(status, keep_down and request_done.is_set(), reusable)


async def _finish_resumed(
    reader: _Reader,
    downstream: Stream,
    head: RequestHead,
    fwd: Forward,
    end: RelayEnd,
    progress: _Progress,
    native: _Native | None,
) -> _Done:
    """The rest of an exchange the C relay began: the request (and its body) went up
    whole; its response is relayed from the bytes the relay had read of it."""
    if end.upstream_error is not None:
        raise UpstreamBroke(end.upstream_error)
    if head.body.framing is not Framing.NONE:  # sent already: count it, read past it
        while not isinstance(event := await reader.next_event(), EndOfMessage):
            assert isinstance(event, Body)  # the relay took it whole
            progress.bytes_up += len(event.data)
    parser = ResponseParser()
    parser.expect(head.method, upgrade=head.upgrade is not None)
    up = _Reader(fwd.upstream, parser, end.response)
    status, keep_down, keep_up = await _relay_response(
        up, downstream, head, fwd, reader, progress, native=native
    )
    return _Done(status, keep_down, keep_up and not up.has_pending())


async def _relay_response(
    up: _Reader,
    downstream: Stream,
    request: RequestHead,
    fwd: Forward,
    down_reader: _Reader,
    progress: _Progress,
    *,
    first: Event | None = None,
    native: _Native | None = None,
    sent: trio.Event | None = None,
) -> tuple[int, bool, bool]:
    """Stream the response down. Returns (status, downstream keep-alive, upstream reusable).

    ``native``: the C pump may move a big body, once the request was sent (``sent`` is
    set, or None: sent before the call)."""
    head: ResponseHead | None = None
    while True:
        try:
            if first is not None:
                event: Event | None = first
                first = None
            else:
                event = await up.next_event()
        except (trio.BrokenResourceError, OSError) as exc:
            if head is None:
                raise UpstreamBroke(describe(exc)) from None
            raise ConnectionBroken(describe(exc), UPSTREAM) from exc
        if event is None:
            if head is None:
                raise UpstreamBroke("connection closed before a response")
            raise ConnectionBroken("closed inside a response", UPSTREAM)
        if isinstance(event, ResponseHead):
            if event.is_informational and event.status != 101:
                with broken_at(DOWNSTREAM):
                    await downstream.send_all(
                        serialize_response_head(event, headers=event.headers)
                    )
                progress.head_down = True
                continue
            head = event
            chunk_down = _chunk_down(event, request)
            headers = strip_hop_by_hop(event.headers, keep_upgrade=event.status == 101)
            headers = (*headers, *fwd.response_headers)
            if chunk_down:
                headers = (*headers, (b"Transfer-Encoding", b"chunked"))
            close_down = not request.keep_alive or (
                not _delimited_down(event, request) and event.status != 101
            )
            if close_down and event.status != 101:
                headers = (*headers, (b"Connection", b"close"))
            with broken_at(DOWNSTREAM):
                await downstream.send_all(
                    serialize_response_head(
                        ResponseHead(status=event.status, reason=event.reason), headers=headers
                    )
                )
            progress.head_down = True
        elif isinstance(event, Body):
            assert head is not None
            progress.bytes_down += len(event.data)
            with broken_at(DOWNSTREAM):
                await downstream.send_all(
                    serialize_chunk(event.data) if _chunk_down(head, request) else event.data
                )
            if native is not None and (sent is None or sent.is_set()):
                progress.bytes_down += await _copy_body(up, downstream, native)
        elif isinstance(event, EndOfMessage):
            assert head is not None
            if _chunk_down(head, request):
                with broken_at(DOWNSTREAM):
                    await downstream.send_all(serialize_last_chunk(event.trailers))
            keep_down = request.keep_alive and _delimited_down(head, request)
            return head.status, keep_down, head.keep_alive
        elif isinstance(event, Upgraded):
            assert head is not None
            tunnel_pump = native if sent is None or sent.is_set() else None
            await _tunnel(down_reader, downstream, up.stream, event.leftover, tunnel_pump)
            return head.status, False, False


async def _copy_body(up: _Reader, downstream: Stream, native: _Native) -> int:
    """Move the rest of a Content-Length response body from ``up`` to ``downstream`` in
    the C pump (see ``_copy_rest``); the bytes moved, 0 when it did not."""
    if not isinstance(up.parser, ResponseParser) or up.has_pending():
        return 0  # a failed parser's stand-in, or events to relay first
    return await _copy_rest(up, downstream, native, until_reply=False, ends=(UPSTREAM, DOWNSTREAM))


async def _copy_rest(
    reader: _Reader, dst: Stream, native: _Native, *, until_reply: bool, ends: tuple[str, str]
) -> int:
    """The C pump's copy of the rest of the Content-Length body ``reader`` is in (when
    NATIVE_BODY_BYTES or more are to come) to ``dst``; the parser counts what moved, and
    the reader has the body's end when all of it did. Returns the bytes moved: 0 when
    the pump cannot take it, and the caller goes on in Python. ``ends``: the names of
    the reader's end and of ``dst``'s (a failure is a ConnectionBroken naming one)."""
    parser = reader.parser
    size = parser.body_remaining
    if size < NATIVE_BODY_BYTES:
        return 0
    src_end, dst_end = stream_end(reader.stream), stream_end(dst)
    if src_end is None or dst_end is None:
        return 0
    try:
        moved = await native.pump.copy(
            src_end, dst_end, size, idle_seconds=native.idle_seconds, until_reply=until_reply,
            ends=ends,
        )
    except NativeRefused as exc:
        log_refusal(_BODY_REFUSED, str(exc))
        return 0
    assert moved == size or until_reply
    if moved:
        reader.push_front(parser.skip_body(moved))
    return moved


async def _send_body_natively(
    reader: _Reader, upstream: Stream, native: _Native, progress: _Progress
) -> None:
    """Send what was read of a Content-Length request body, then as much of the rest as
    the C pump moves before the upstream answers (NATIVE_BODY_BYTES or more, else
    nothing). The caller streams whatever is left, in Python, while it relays the
    answer. Before the relay starts: nothing else uses either connection meanwhile."""
    if not isinstance(reader.parser, RequestParser):
        return
    while reader.has_pending():
        event = await reader.next_event()
        if not isinstance(event, Body):
            assert event is not None
            reader.push_front([event])  # the body's end: the caller's loop sees it
            return
        progress.bytes_up += len(event.data)
        with broken_at(UPSTREAM):
            await upstream.send_all(event.data)
    progress.bytes_up += await _copy_rest(
        reader, upstream, native, until_reply=True, ends=(DOWNSTREAM, UPSTREAM)
    )


async def _end_of_bodyless(reader: _Reader) -> None:
    """Consume the EndOfMessage that follows a request head without a body."""
    event = await reader.next_event()
    if not isinstance(event, EndOfMessage):
        raise HttpError(400, f"expected the end of a bodyless request, got {type(event).__name__}")


def _chunk_down(response: ResponseHead, request: RequestHead) -> bool:
    """Re-frame as chunked towards the client: a chunked body, or an until-close body
    for an HTTP/1.1 client (so its connection can stay open)."""
    if request.http_version != b"1.1":
        return False
    return response.body.framing in (Framing.CHUNKED, Framing.UNTIL_CLOSE)


def _delimited_down(response: ResponseHead, request: RequestHead) -> bool:
    """Whether the client can tell where the body ends without a close (no body, a
    Content-Length, or re-chunked for it), so its connection may carry another request.
    The upstream's own ``Connection: close`` does not matter: it is hop-by-hop, and the
    next request gets another upstream connection."""
    if response.body.framing in (Framing.NONE, Framing.CONTENT_LENGTH):
        return True
    return _chunk_down(response, request)


async def _tunnel(
    down_reader: _Reader,
    downstream: Stream,
    upstream: Stream,
    leftover: bytes,
    native: _Native | None = None,
) -> None:
    """After a 101: bytes both ways until either side ends, in the C pump when there is
    one (a WebSocket costs what an L4 connection does). No idle limit, in either pump:
    a quiet WebSocket is normal. A cancel point."""
    parser = down_reader.parser
    assert isinstance(parser, RequestParser)
    early = parser.accept_upgrade().leftover
    if leftover:
        with broken_at(DOWNSTREAM):
            await downstream.send_all(leftover)
    if early:
        with broken_at(UPSTREAM):
            await upstream.send_all(early)
    if native is not None and await _tunnel_natively(downstream, upstream, native):
        return

    async def pump(src: Stream, dst: Stream, scope: trio.CancelScope) -> None:
        try:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()

    async with trio.open_nursery() as tunnel:
        tunnel.start_soon(pump, downstream, upstream, tunnel.cancel_scope)
        tunnel.start_soon(pump, upstream, downstream, tunnel.cancel_scope)


async def _tunnel_natively(downstream: Stream, upstream: Stream, native: _Native) -> bool:
    """The tunnel in the C pump; False when the pump cannot take it (nothing moved)."""
    down_end, up_end = stream_end(downstream), stream_end(upstream)
    if down_end is None or up_end is None:
        return False
    try:
        await native.pump.splice(down_end, up_end, idle_seconds=math.inf, either_end=True)
    except NativeRefused as exc:
        log_refusal(_TUNNEL_REFUSED, str(exc))
        return False
    except ConnectionBroken:
        pass  # as in Python: a tunnel ends when either side fails
    return True


async def _send_quietly(stream: Stream, data: bytes) -> None:
    try:
        with trio.move_on_after(5):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


def _access(
    method: str,
    path: str,
    status: int,
    sent: int,
    received: int,
    seconds: float,
    labels: dict[str, str],
    fields: dict[str, object],
) -> None:
    if not access_log.enabled("info"):
        return
    access_log.info(
        "request",
        method=method,
        path=path,
        status=status,
        bytes_in=sent,
        bytes_out=received,
        duration_ms=round(seconds * 1000, 2),
        **labels,
        **fields,
    )


def mesh_request_headers(head: RequestHead, *, source: str | None) -> Headers:
    """Inbound side: drop hop-by-hop fields and any ``x-meshagent-source`` that came
    from the caller; add the caller's verified service name when there is one."""
    headers = strip_hop_by_hop(head.headers, keep_upgrade=head.upgrade is not None)
    headers = remove_headers(headers, (SOURCE_HEADER,))
    if source is not None:
        headers = (*headers, (SOURCE_HEADER, source.encode()))
    return headers


SOURCE_HEADER = b"x-meshagent-source"
