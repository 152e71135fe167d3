"""A bounded pool of idle upstream connections, per endpoint (HTTP keep-alive; a TCP
outbound's ``meshagent/2`` connections, each carrying one stream after another).

A new client connection then does not cost a new TCP connection and TLS handshake to
the other host. Bounds: at most ``max_idle_per_key`` idle connections per endpoint and
``max_idle`` in all (the oldest goes first); an idle connection older than
``idle_seconds`` is closed instead of reused. Before reuse, a connection that is
readable (the peer closed it, or sent bytes nobody asked for) is thrown away: that
check is one ``poll`` on the socket, and it catches the common case of a server that
timed the connection out while it sat in the pool.

``sweep`` (every ``SWEEP_SECONDS``, from ``sweep_forever`` in the data plane's pump
nursery) closes the expired and stale ones of every key, including keys nobody asks
for any more (an endpoint gone from the catalog, a client context replaced by a
certificate renewal): without it they would hold their descriptors until evicted.

Connects are bounded too: at most ``max_connecting_per_key`` at once per endpoint. A
burst of first requests (ten thousand clients that each send one) would otherwise start
a TCP connect and TLS handshake for every request at once; the called side then shares
its CPU among all of them, every handshake takes as long as all of them together, and
most time out. Past the bound a request waits, in arrival order, for whichever comes
first: a connection another request gives back (handed over directly, never idling in
between) or a connect slot another connect frees; it waits at most ``wait_seconds``
(``PoolTimeout``). The endpoint then handshakes at the pace it can bear, not all at
once, and connections that requests give back early serve the requests still in line.
"""

from __future__ import annotations

import functools
import select
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

import trio

from meshagent.dataplane.errors import UpstreamTimeout
from meshagent.dataplane.plainsocket import PlainSocketStream, fd_ready
from meshagent.dataplane.sslsocket import SslSocketStream

Upstream = SslSocketStream | PlainSocketStream
SWEEP_SECONDS = 5.0
# Connects at once per key. Enough to keep a TLS handshake in flight on each core of the
# called side, with the round trips of the others overlapping; few enough that a burst
# does not drown it (see the module's docstring).
MAX_CONNECTING_PER_KEY = 64


def is_stale(stream: Upstream) -> bool:
    """True if the idle connection has something to read (EOF, stray bytes, or bytes
    OpenSSL already decrypted; not TLS 1.3 session tickets). Not async."""
    try:
        if isinstance(stream, SslSocketStream):
            return stream.is_stale()
        return fd_ready(stream.fileno(), select.POLLIN)
    except (OSError, ValueError):
        return True


class PoolTimeout(UpstreamTimeout):
    """A request waited its deadline for a connection while the endpoint's connect slots
    were all taken. Not the endpoint's failure: the connects in progress report theirs."""


@dataclass(slots=True)
class _Idle:
    stream: Upstream
    since: float


@dataclass(slots=True, eq=False)
class _Waiter:
    """A request waiting for a connection or a connect slot. ``woken`` is set when one
    is handed over: ``stream`` then holds the connection, or None for a slot (counted
    in the key's connects already, on the waiter's behalf)."""

    woken: trio.Event
    stream: Upstream | None = None


class ConnectionPool:
    """Idle connections by key. ``acquire`` gives a pooled one or opens a new one."""

    def __init__(
        self,
        connect: Callable[[Hashable], Awaitable[Upstream]] | None,
        *,
        # As many as requests in flight to one endpoint at a busy moment: a smaller bound
        # closes, at every lull, connections the next burst must open (and handshake)
        # again. Idle connections cost memory only, and expire after idle_seconds.
        max_idle_per_key: int = 256,
        max_idle: int = 2048,
        idle_seconds: float = 60.0,
        max_connecting_per_key: int | None = None,  # None: MAX_CONNECTING_PER_KEY, now
    ) -> None:
        self._connect = connect
        self._max_per_key = max_idle_per_key
        self._max_idle = max_idle
        self._idle_seconds = idle_seconds
        self._max_connecting = (
            MAX_CONNECTING_PER_KEY if max_connecting_per_key is None else max_connecting_per_key
        )
        self._idle: OrderedDict[Hashable, deque[_Idle]] = OrderedDict()
        self._count = 0
        self._connecting: dict[Hashable, int] = {}
        # Per key, in arrival order; a dict so that a waiter that gives up leaves in O(1).
        self._waiters: dict[Hashable, dict[_Waiter, None]] = {}
        self._closing = False
        self.reused = 0
        self.opened = 0

    async def acquire(
        self,
        key: Hashable,
        *,
        wait_seconds: float,
        connect: Callable[[], Awaitable[Upstream]] | None = None,
    ) -> tuple[Upstream, bool]:
        """A connection to ``key`` and whether it was reused. A cancel point.

        ``wait_seconds``: how long to wait, when the key's connect slots are all taken,
        for a connection given back or a slot (then ``PoolTimeout``; at once when 0,
        without a place in line); the connect itself keeps its own deadlines.
        ``connect``: how to open this one, instead of the pool's own ``connect(key)``
        (a pool made without one: the TCP outbounds' pools, whose connects need the
        connection's snapshot). Raises whatever the connect raises, or ``PoolTimeout``.
        """
        stream = self.take(key)
        if stream is not None:
            return stream, True
        if connect is None:
            assert self._connect is not None, "a pool without connect only lends (take)"
            connect = functools.partial(self._connect, key)
        if self._connecting.get(key, 0) >= self._max_connecting:
            if wait_seconds <= 0:
                raise PoolTimeout(f"{self._connecting[key]} connects already in progress")
            stream = await self._wait(key, wait_seconds)
            if stream is not None:
                return stream, True
        else:
            self._connecting[key] = self._connecting.get(key, 0) + 1
        try:  # the slot is ours: taken just now, or handed over by _wait
            stream = await connect()
        finally:
            self._free_slot(key)
        self.opened += 1
        return stream, False

    def connecting(self, key: Hashable) -> int:
        """Connects to ``key`` in progress (or handed over to a waiter about to start)."""
        return self._connecting.get(key, 0)

    def waiting(self, key: Hashable) -> int:
        """Requests waiting for a connection to ``key``."""
        return len(self._waiters.get(key, ()))

    async def _wait(self, key: Hashable, seconds: float) -> Upstream | None:
        """Wait in line for a connection (returned) or a connect slot (None)."""
        waiter = _Waiter(trio.Event())
        line = self._waiters.setdefault(key, {})
        line[waiter] = None
        try:
            with trio.move_on_after(seconds):
                await waiter.woken.wait()
        except BaseException:  # cancelled: what was handed over goes to the next in line
            if waiter.woken.is_set():
                self._pass_on(key, waiter)
            raise
        finally:
            line.pop(waiter, None)
            if not line and self._waiters.get(key) is line:
                del self._waiters[key]
        if not waiter.woken.is_set():
            raise PoolTimeout(
                f"no connection within {seconds:g}s: "
                f"{self._connecting.get(key, 0)} connects already in progress"
            )
        if waiter.stream is not None:
            self.reused += 1
        return waiter.stream

    def _pass_on(self, key: Hashable, waiter: _Waiter) -> None:
        if waiter.stream is None:
            self._free_slot(key)
        else:
            self.release(key, waiter.stream)

    def _next_waiter(self, key: Hashable) -> _Waiter | None:
        """Take the first in line for ``key`` out of the line."""
        line = self._waiters.get(key)
        if not line:
            return None
        waiter = next(iter(line))
        del line[waiter]
        if not line:
            del self._waiters[key]
        return waiter

    def _free_slot(self, key: Hashable) -> None:
        """A connect to ``key`` ended: its slot goes to the first in line, if any."""
        waiter = self._next_waiter(key)
        if waiter is not None:
            waiter.woken.set()  # the slot stays counted, now on the waiter's behalf
            return
        left = self._connecting[key] - 1
        if left:
            self._connecting[key] = left
        else:
            del self._connecting[key]

    def take(self, key: Hashable) -> Upstream | None:
        """An idle connection to ``key`` that still looks usable, or None (stale ones are
        closed on the way)."""
        now = trio.current_time()
        idle = self._idle.get(key)
        while idle:
            entry = idle.pop()  # the most recently used first: the least likely stale
            self._count -= 1
            if self._usable(entry, now):
                self.reused += 1
                return entry.stream
            entry.stream.close()
        return None

    def release(self, key: Hashable, stream: Upstream) -> None:
        """Hand ``stream`` to the first request waiting for one (also while the agent
        drains: that request would open a connection otherwise), else keep it for
        reuse, or close it when the pool is full or closing. Not async: a release
        never waits (closing is ``close``), so cleanup needs no shielded scope."""
        waiter = self._next_waiter(key)
        if waiter is not None:
            waiter.stream = stream
            waiter.woken.set()
            return
        if self._closing:
            stream.close()
            return
        idle = self._idle.setdefault(key, deque())
        self._idle.move_to_end(key)
        if len(idle) >= self._max_per_key:
            stream.close()
            return
        idle.append(_Idle(stream, trio.current_time()))
        self._count += 1
        while self._count > self._max_idle:
            oldest_key, oldest = next(iter(self._idle.items()))
            if not oldest:
                del self._idle[oldest_key]
                continue
            self._count -= 1
            oldest.popleft().stream.close()

    def releaser(self, key: Hashable, stream: Upstream) -> Callable[[bool], None]:
        """What gives ``stream`` back after a request (``http_proxy.Release``):
        ``release(reusable)`` returns it here when reusable, else closes it."""

        def release(reusable: bool) -> None:
            if reusable:
                self.release(key, stream)
            else:
                stream.close()

        return release

    def idle_count(self) -> int:
        return self._count

    def gauges(self) -> tuple[int, int, int]:
        """(idle connections, connects in progress, requests waiting in line), over every
        key: what the metrics show of the pool. Not async."""
        connecting = sum(self._connecting.values())
        waiting = sum(len(line) for line in self._waiters.values())
        return self._count, connecting, waiting

    def _usable(self, entry: _Idle, now: float) -> bool:
        """Not expired, and nothing to read on it (see ``is_stale``)."""
        return now - entry.since < self._idle_seconds and not is_stale(entry.stream)

    def sweep(self) -> int:
        """Close every idle connection that expired or turned stale, under every key;
        return how many."""
        now = trio.current_time()
        closed = 0
        for key in list(self._idle):
            kept: deque[_Idle] = deque()
            for entry in self._idle[key]:
                if self._usable(entry, now):
                    kept.append(entry)
                else:
                    entry.stream.close()
                    closed += 1
            if kept:
                self._idle[key] = kept
            else:
                del self._idle[key]
        self._count -= closed
        return closed

    def close_idle(self) -> None:
        """The agent drains: close every idle connection, and from now on every one
        released (connections in use finish their request first)."""
        self._closing = True
        self.close()

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            while idle:
                idle.pop().stream.close()
        self._idle.clear()
        self._count = 0


async def sweep_forever(pools: list[ConnectionPool], seconds: float = SWEEP_SECONDS) -> None:
    """Sweep ``pools`` every ``seconds`` until cancelled."""
    while True:
        await trio.sleep(seconds)
        for pool in pools:
            pool.sweep()
