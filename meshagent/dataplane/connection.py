"""What every connection handler shares: ids, the snapshot source, TLS, the error boundary."""

from __future__ import annotations

import bisect
import itertools
import random
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

from meshagent.dataplane.errors import (
    DOWNSTREAM,
    ConnectionBroken,
    DataplaneError,
    HandshakeError,
    NoEndpoints,
    PeerProtocolError,
    Unauthorized,
    UpstreamConnectError,
    UpstreamTimeout,
    describe_failure,
)
from meshagent.dataplane.nativepump import NativePump, Stoppable
from meshagent.dataplane.pool import ConnectionPool
from meshagent.dataplane.tls import TlsContexts
from meshagent.log import Logger
from meshagent.protocol.frames import FrameError
from meshagent.snapshot.model import Snapshot


class SnapshotSource(Protocol):
    """Where the data path reads its configuration: the latest published snapshot."""

    @property
    def current(self) -> Snapshot: ...


@dataclass(slots=True)
class ConnectionCounters:
    accepted: int = 0
    active: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # Inbound connections that came without TLS (permissive/off): legacy callers that
    # skip the mesh. A mesh can go strict once this stops growing.
    plaintext: int = 0
    # Failed connections by reason: handshake, unauthorized, upstream-connect,
    # upstream-timeout, no-endpoints, protocol, downstream-broken, upstream-broken (an
    # end failed while bytes moved), error (anything unexpected).
    failures: dict[str, int] = field(default_factory=dict)
    # Failed TLS handshakes by why (errors.HANDSHAKE_REASONS): no-certificate, unknown-ca,
    # expired, not-tls, ...
    tls_failures: dict[str, int] = field(default_factory=dict)
    # Inbound TLS handshakes done, by whether they resumed a session (the resumed ones
    # skip both certificate signatures: a low share costs CPU on both agents).
    tls_full: int = 0
    tls_resumed: int = 0
    # HTTP requests answered 503 because every connect slot to the endpoint (outbound)
    # or the app (inbound) stayed taken for as long as a connect could take.
    busy: int = 0
    # Gauges of the listener's connection pool (HTTP: to the endpoints or the app; TCP
    # outbound: idle meshagent/2 connections), as DataplaneContext.sample_pools last
    # read them; ``pooled``: the listener has a pool.
    pooled: bool = False
    pool_idle: int = 0
    pool_connecting: int = 0
    pool_waiting: int = 0

    def add(self, other: ConnectionCounters) -> None:
        """Add ``other``'s counts to these (summing listeners, or processes)."""
        self.accepted += other.accepted
        self.active += other.active
        self.failed += other.failed
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.plaintext += other.plaintext
        self.tls_full += other.tls_full
        self.tls_resumed += other.tls_resumed
        self.busy += other.busy
        self.pooled = self.pooled or other.pooled
        self.pool_idle += other.pool_idle
        self.pool_connecting += other.pool_connecting
        self.pool_waiting += other.pool_waiting
        for reason, count in other.failures.items():
            self.failures[reason] = self.failures.get(reason, 0) + count
        for reason, count in other.tls_failures.items():
            self.tls_failures[reason] = self.tls_failures.get(reason, 0) + count

    def retire(self) -> None:
        """The process behind these counts is gone: its gauges drop to nothing (its
        counts stay in the totals)."""
        self.active = self.pool_idle = self.pool_connecting = self.pool_waiting = 0


LATENCY_BUCKETS_SECONDS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@dataclass(slots=True)
class HttpStats:
    """Plain counters of HTTP requests, read by the metrics collector at scrape time.

    ``requests`` by (destination, route, subset, source, status class); latency buckets
    (cumulative counts per upper bound, then +Inf), sum and count by (destination, route).
    """

    requests: dict[tuple[str, str, str, str, str], int] = field(default_factory=dict)
    latency: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def record(self, labels: dict[str, str], status: int, seconds: float) -> None:
        self.record_many(labels, ((status, seconds),))

    def record_many(self, labels: dict[str, str], answers: Iterable[tuple[int, float]]) -> None:
        """(status, seconds) of requests with the same labels (the C relay's batches:
        the labels are looked up once)."""
        classes = [0] * 6
        first_bucket = [0] * (len(LATENCY_BUCKETS_SECONDS) + 1)  # by the first that holds it
        total = 0.0
        for status, seconds in answers:
            classes[status // 100 if 100 <= status < 600 else 0] += 1
            first_bucket[bisect.bisect_left(LATENCY_BUCKETS_SECONDS, seconds)] += 1
            total += seconds
        self.record_summary(labels, classes, first_bucket, total)

    def record_summary(
        self,
        labels: dict[str, str],
        classes: Sequence[int],
        first_bucket: Sequence[int],
        total: float,
    ) -> None:
        """Requests with the same labels, summed up: counts by status class
        (``classes[n]``: nxx, ``classes[0]``: none of those), counts by the first of
        ``LATENCY_BUCKETS_SECONDS`` that holds their seconds (then +Inf), and their
        seconds in all (the C relay's summaries)."""
        if len(first_bucket) != len(LATENCY_BUCKETS_SECONDS) + 1:
            raise ValueError("a summary has a count per latency bucket, then +Inf")
        destination, route = labels.get("destination", ""), labels.get("route", "")
        subset, source = labels.get("subset", ""), labels.get("source", "")
        slot = self.latency.get((destination, route))
        if slot is None:  # buckets..., +Inf, sum
            slot = self.latency[(destination, route)] = [0.0] * (len(LATENCY_BUCKETS_SECONDS) + 2)
        for status_class, n in enumerate(classes):
            if n:
                key = (destination, route, subset, source, f"{status_class}xx")
                self.requests[key] = self.requests.get(key, 0) + n
        cumulative = 0
        for n in range(len(LATENCY_BUCKETS_SECONDS)):
            cumulative += first_bucket[n]
            slot[n] += cumulative
        slot[-2] += cumulative + first_bucket[-1]
        slot[-1] += total


class Drain:
    """Connections that sit idle between requests (HTTP keep-alive, ``meshagent/2``
    streams) wait under a scope registered here, by listener, so that:

    * the agent stopping (``begin``) closes them all at once (their peers reconnect
      elsewhere), while busy ones close after their request;
    * a listener at its ``max_connections`` closes its longest-idle one when a new
      client waits (``reclaim``), rather than leaving that client in the backlog
      behind connections nobody uses; when none is idle, the first to become idle
      while the client still waits is closed at once (``wanted``).
    """

    def __init__(self) -> None:
        self.started = False
        # per listener, the waiting scopes in the order they began to wait
        self._idle: dict[str, dict[Stoppable, None]] = {}
        # listeners with a client waiting at the limit and nothing idle to close for it
        self._wanted: set[str] = set()

    def begin(self) -> None:
        self.started = True
        for scopes in self._idle.values():
            for scope in scopes:
                scope.cancel()

    def idle(self, scope: Stoppable, listener: str) -> _IdleWait:
        """A context manager: while inside, a drain, or ``reclaim(listener)``, cancels
        ``scope`` (a ``trio.CancelScope``, or a relay's stop; a drain at once if one
        already began). A class, not ``contextlib.contextmanager``: every relay run of
        every connection enters one, and a generator's context manager costs more."""
        return _IdleWait(self, scope, listener)

    def reclaim(self, listener: str) -> bool:
        """Cancel the wait of the connection of ``listener`` idle the longest; False
        when none is idle."""
        scopes = self._idle.get(listener)
        while scopes:
            scope = next(iter(scopes))
            del scopes[scope]
            if not scope.cancel_called:
                scope.cancel()
                return True
        return False

    @contextmanager
    def wanted(self, listener: str) -> Iterator[None]:
        """While inside, the next connection of ``listener`` to become idle is closed
        as it does (its wait cancelled on entry), once: for a client that waits at the
        listener's limit when ``reclaim`` found nothing idle."""
        self._wanted.add(listener)
        try:
            yield
        finally:
            self._wanted.discard(listener)


class _IdleWait:
    __slots__ = ("_drain", "_listener", "_scope", "_scopes")

    def __init__(self, drain: Drain, scope: Stoppable, listener: str) -> None:
        self._drain = drain
        self._scope = scope
        self._listener = listener

    def __enter__(self) -> None:
        drain, scope = self._drain, self._scope
        if drain.started:
            scope.cancel()
        elif drain._wanted and self._listener in drain._wanted:
            drain._wanted.discard(self._listener)
            scope.cancel()
        scopes = drain._idle.get(self._listener)
        if scopes is None:
            scopes = drain._idle[self._listener] = {}
        scopes[scope] = None
        self._scopes = scopes

    def __exit__(self, *exc_info: object) -> None:
        self._scopes.pop(self._scope, None)


@dataclass(slots=True)
class DataplaneContext:
    source: SnapshotSource
    tls: TlsContexts
    by_listener: dict[str, ConnectionCounters] = field(default_factory=dict)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    rng: random.Random = field(default_factory=random.Random)  # splits; seeded in tests
    http: HttpStats = field(default_factory=HttpStats)
    drain: Drain = field(default_factory=Drain)
    pump: NativePump | None = None  # the C pump of L4 connections, when available
    pools: dict[str, ConnectionPool] = field(default_factory=dict)  # by listener

    def sample_pools(self) -> None:
        """Read every listener's pool into its counters' gauges (before they are read)."""
        for name, pool in self.pools.items():
            counters = self.listener_counters(name)
            counters.pooled = True
            counters.pool_idle, counters.pool_connecting, counters.pool_waiting = pool.gauges()

    def listener_counters(self, listener: str) -> ConnectionCounters:
        counters = self.by_listener.get(listener)
        if counters is None:
            counters = self.by_listener[listener] = ConnectionCounters()
        return counters

    @property
    def counters(self) -> ConnectionCounters:
        """The sum over every listener (a new record; read-only)."""
        total = ConnectionCounters()
        for c in self.by_listener.values():
            total.add(c)
        return total


def peer_address(sock: socket.socket) -> str:
    """``host:port`` of the other end of an accepted connection ("?" when gone)."""
    try:
        host, port, *_ = sock.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


def describe(exc: BaseException) -> str:
    """One short line for a connection failure, flattening exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return describe_failure(exc)


@contextmanager
def connection_boundary(
    ctx: DataplaneContext, log: Logger, listener: str, **fields: object
) -> Iterator[ConnectionCounters]:
    """The error boundary of one connection: count it, and turn every Exception into a
    log line.

    ``trio.Cancelled`` passes through untouched, also when it arrives in one exception
    group with a connection error (the agent is draining and this connection broke at
    the same moment): the error is logged here and only the cancellation goes on, so a
    broken connection can never take the listener's nursery down with it.
    """
    counters = ctx.listener_counters(listener)
    counters.accepted += 1
    counters.active += 1
    try:
        yield counters
    except* Exception as group:
        counters.failed += 1
        reason = failure_reason(group)
        counters.failures[reason] = counters.failures.get(reason, 0) + 1
        if reason == "handshake":
            tls = _tls_reason(group)
            counters.tls_failures[tls] = counters.tls_failures.get(tls, 0) + 1
        leaves = list(_leaves(group))
        if all(_client_gone(e) for e in leaves):
            level = log.info  # a client that reset or vanished: its own business
        elif all(isinstance(e, DataplaneError) for e in leaves):
            level = log.warning
        else:
            level = log.error  # not one of ours: a bug to report
        level("connection failed", error=describe(group), listener=listener, **fields)
    finally:
        counters.active -= 1


_REASONS: dict[type[BaseException], str] = {
    HandshakeError: "handshake",
    Unauthorized: "unauthorized",
    UpstreamConnectError: "upstream-connect",
    UpstreamTimeout: "upstream-timeout",
    NoEndpoints: "no-endpoints",
    PeerProtocolError: "protocol",
    FrameError: "protocol",
}


def _client_gone(exc: BaseException) -> bool:
    """The downstream end's socket or TLS failed (not its framing: a broken peer agent)."""
    return (
        isinstance(exc, ConnectionBroken)
        and exc.end == DOWNSTREAM
        and not isinstance(exc.__cause__, FrameError)
    )


def failure_reason(exc: BaseException) -> str:
    """A short, bounded label for why a connection failed (for metrics)."""
    for leaf in _leaves(exc):
        if isinstance(leaf, ConnectionBroken):
            if isinstance(leaf.__cause__, FrameError):
                return "protocol"
            return f"{leaf.end}-broken" if leaf.end is not None else "error"
        for kind, reason in _REASONS.items():
            if isinstance(leaf, kind):
                return reason
    return "error"


def _tls_reason(exc: BaseException) -> str:
    for leaf in _leaves(exc):
        if isinstance(leaf, HandshakeError):
            return leaf.reason
    return "other"


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
