"""The C pump of established L4 connections (``dataplane/_pump.c``), driven from trio.

Why. Pumping an L4 connection in Python costs a trio wake-up, a task switch and a few
Python-level calls per chunk per direction; on small messages that is most of the
agent's CPU (docs/performance.md). Here the connection is set up in Python as before
(accept, TLS handshake, peer check, policy, upstream connect), then its two sockets are
handed to one ``Engine`` per agent process, which moves the bytes in C, in a thread of
its own that never takes the GIL.

Theory of operation::

    serve_dataplane
    └── pump nursery         NativePump.run: waits for the engine's "done" eventfd and
        │                    wakes the connections that ended (Engine.collect)
        ├── engine thread    Engine.serve() through trio.to_thread (its own limiter),
        │                    until NativePump.run ends (Engine.stop)
        └── connections      each L4 connection task: NativePump.splice waits for its end

* The engine never owns a descriptor: the connection task keeps its streams and closes
  them when the engine reports the end (or, when cancelled, after taking the connection
  back with ``Engine.remove``). The pump nursery outlives the connections nursery.
* Same behaviour as ``tcp_proxy.splice`` (which stays the fallback): half-close,
  framing and its checks, backpressure (one chunk per direction), idle expiry, errors as
  ``ConnectionBroken`` naming the end that failed (the engine says which side's
  socket, TLS or framing it was), byte counts.
* A TLS 1.3 client's session is offered to ``TlsContexts`` after its first bytes: the
  engine pauses that connection and reports ``FIRST_READ``; ``_finished`` calls the
  stream's ``first_read`` in the trio thread (the engine does not touch that SSL object
  meanwhile), then resumes it.
* ``relay`` serves an HTTP connection's plain requests in the engine (an inbound's or
  an outbound's, from ``http_proxy``), handing back what it does not take; each
  exchange it finishes comes back as a record, in batches (``RECORDS_SECONDS``, a
  second eventfd and ``Engine.records``), for the metrics and the access log; without
  an access log, as sums (``summary``). A relay that renews ahead (an outbound's,
  ``Renewal``) reports its block's end among them (and through the done eventfd, so
  at once); the relay's own task chooses the next upstream meanwhile.
* When the C extension is missing (no compiler at install time), the ``_ssl`` module
  does not use a shared libssl, or ``MESHAGENT_NATIVE_PUMP=0`` is set, ``native_problem``
  says why and the agent pumps in Python.
"""

from __future__ import annotations

import enum
import functools
import os
import ssl
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from meshagent.dataplane.errors import DOWNSTREAM, UPSTREAM, ConnectionBroken
from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.sslsocket import SslSocketStream
from meshagent.log import get_logger
from meshagent.protocol.frames import DEFAULT_MAX_PAYLOAD, FrameError

try:
    from meshagent.dataplane import _pump
except ImportError:  # built without a C compiler: the Python pump serves
    _pump = None

ENV_SWITCH: Final = "MESHAGENT_NATIVE_PUMP"
# Relayed exchanges reach the metrics and the access log in batches: the engine's thread
# wakes trio at most this often for them (ends of connections wake it at once).
RECORDS_SECONDS: Final = 0.02
NEXT_REFUSED: Final = (
    "l4 pump refused the next upstream of an HTTP relay; choosing again (logged once)"
)

log = get_logger("dataplane")
_refusals_logged: set[str] = set()

# What the engine needs of one end: (descriptor, the _ssl object or None, kind).
End = tuple[int, object | None, int]


def native_problem() -> str | None:
    """None when L4 connections can be pumped in C here; otherwise why not (one line)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"turned off by {ENV_SWITCH}=0"
    if _pump is None:
        return (
            "the C extension meshagent.dataplane._pump is not built "
            "(no C compiler or Python headers at install time?)"
        )
    assert ssl.OPENSSL_VERSION  # _ssl loaded: the engine looks its libssl up
    problem: str | None = _pump.tls_problem()
    return problem


def stream_end(stream: object, *, framed: bool = False) -> End | None:
    """What the engine needs to take ``stream`` over (TLS framed or raw), or None when it
    cannot: not a ``PlainSocketStream``/``SslSocketStream``, closed, or busy."""
    assert _pump is not None
    if isinstance(stream, PlainSocketStream):
        fd = stream.fileno()
        return None if fd < 0 or framed else (fd, None, _pump.PLAIN)
    if isinstance(stream, SslSocketStream) and stream.pumpable:
        kind = _pump.FRAMED if framed else _pump.RAW
        return stream.fileno(), stream.ssl_object._sslobj, kind  # type: ignore[attr-defined]
    return None


def log_refusal(message: str, reason: str) -> None:
    """``message`` as a warning the first time the C pump refuses for a reason (the
    same reason would come with every connection), then as debug lines."""
    key = f"{message}\0{reason}"
    if key in _refusals_logged:
        log.debug(message, error=reason)
        return
    if len(_refusals_logged) < 32:  # the engine has a handful of reasons
        _refusals_logged.add(key)
    log.warning(message, error=reason)


class NativeRefused(Exception):
    """The engine would not take the connection (nothing moved yet: pump it in Python)."""


class RelayOutcome(enum.Enum):
    """Why an HTTP relay ended (the ``RELAY_*`` outcomes of ``_pump.c``)."""

    CLOSED = "closed"  # the downstream ended (or broke) between requests
    IDLE = "idle"  # no request for hold_seconds
    STOPPED = "stopped"  # relay_stop (a drain, or the listener at its limit)
    REQUEST = "request"  # a request the relay does not take: Python serves it
    HEAD_TIMEOUT = "head timeout"  # a request head took over head_seconds: 408
    UPSTREAM_SPENT = "upstream spent"  # the upstream may not carry another request
    CLOSE = "close"  # the exchange closes the downstream (Connection: close)
    RESPONSE = "response"  # after the request went up: Python relays the response
    RENEW = "renew"  # max_requests or max_seconds: Python decides again where requests go


def _outcomes() -> dict[int, RelayOutcome]:
    if _pump is None:
        return {}
    return {getattr(_pump, f"RELAY_{o.name}"): o for o in RelayOutcome}


_OUTCOMES: Final = _outcomes()


@dataclass(frozen=True, slots=True)
class RelayEnd:
    """Why an HTTP relay (``NativePump.relay``) gave its connections back.

    ``outcome`` says why (``RelayOutcome``). ``downstream``
    holds the bytes read from the downstream and not served: the next request(s), or,
    after ``RESPONSE``, the request that went up and whatever followed it.
    ``response`` (``RESPONSE`` only) holds the response bytes read so far, and
    ``upstream_error`` why the upstream failed before its head, if it did, and
    ``request_id`` the request's ``x-request-id`` as sent (maybe one the relay added).
    ``upstream_reusable``: the last exchange left the upstream fit for another request.
    ``upstream_fd``: with ``reconnect``, a connection the relay opened itself after the
    first upstream closed (-1: none open): the caller's now, the upstream in use (the
    one ``upstream_reusable`` and ``RESPONSE`` are about); the first is spent. With
    ``UPSTREAM_SPENT``, ``upstream_error`` says why such a connect failed, if it did.
    """

    outcome: RelayOutcome
    downstream: bytes
    response: bytes
    upstream_reusable: bool
    upstream_error: str | None
    request_id: bytes | None = None  # RESPONSE: the id the request went up with
    upstream_fd: int = -1


# (status, bytes_in, bytes_out, seconds, method, path, request_id): one relayed exchange
Record = tuple[int, int, int, float, str, str, bytes | None]
# Exchanges of a relay with ``summary``, summed up: (counts by status class, 0 for none
# of 1xx-5xx; counts by the first latency bound that holds the exchange's seconds, then
# +Inf; count; seconds in all).
Summary = tuple[tuple[int, int, int, int, int, int], tuple[int, ...], int, float]
OnRecords = Callable[[list[Record], list[Summary]], None]


class Keep(enum.Enum):
    """Offered instead of an upstream: the current one serves the next block too."""

    KEEP = "keep"


KEEP: Final = Keep.KEEP
# offer(upstream end, KEEP or None, add, notify_first) -> taken: see Renewal.renew
Offer = Callable[[End | Keep | None, bytes, bool], bool]


class Renewal(Protocol):
    """How a relay that renews ahead (``NativePump.relay``'s ``renewal``) gets its next
    upstream without stopping. At the end of a block (``max_requests`` or
    ``max_seconds``) it goes on with its upstream, and the relay's task (the one in
    ``NativePump.relay``) calls ``renew``, which chooses and offers the next upstream.
    The relay switches to it at its next request boundary and calls ``switched``; with
    None offered, it ends there (``RENEW``)."""

    async def renew(self, offer: Offer) -> None:
        """The block is over. ``offer(end, add, notify_first)``: the next upstream (its
        end, the field lines added to its requests, whether its first bytes are to be
        reported), ``KEEP`` (the current one serves the next block: nothing switches),
        or None; False when the relay has ended meanwhile (the upstream stays the
        caller's)."""

    def switched(self, reusable: bool) -> None:
        """The relay sends to the offered upstream now; the previous one is the caller's
        again (``reusable``: fit for another request), to give back in ``settle``.
        Records before this call were the previous upstream's."""

    def settle(self) -> None:
        """Give back what ``switched`` handed over (the relay's task calls it soon
        after; the caller once more after the relay's end). Not async: giving an
        upstream back never waits."""


def _error(ends: tuple[str, str] | None, kind: int, text: str) -> Exception:
    """What a connection the engine ended with ``kind`` (ERROR_* and ERROR_AT_*) and
    ``text`` raises: FrameError or trio.BrokenResourceError, inside a ConnectionBroken
    naming the end that failed when the caller named them (``ends``)."""
    assert _pump is not None
    base: Exception = (
        FrameError(text)
        if kind & ~(_pump.ERROR_AT_A | _pump.ERROR_AT_B) == _pump.ERROR_FRAME
        else trio.BrokenResourceError(text)
    )
    if ends is None:
        return base
    end = ends[0] if kind & _pump.ERROR_AT_A else ends[1] if kind & _pump.ERROR_AT_B else None
    broken = ConnectionBroken(text, end)
    broken.__cause__ = base
    return broken


class _Waiter:
    """What one connection's task waits for in the engine, and how the loop wakes it:
    with ``trio.lowlevel`` directly rather than a ``trio.Event`` (a set, a frame and a
    closure more per idle connection)."""

    __slots__ = (
        "counts", "done", "due", "ends", "error", "expired", "offer", "on_first_read",
        "on_records", "relay_end", "renewal", "settle", "task", "woken",
    )

    def __init__(
        self,
        on_first_read: Callable[[], None] | None,
        on_records: OnRecords | None = None,
        ends: tuple[str, str] | None = None,
    ) -> None:
        self.ends = ends  # names of a and b: an error is a ConnectionBroken naming its end
        self.task: trio.lowlevel.Task | None = None  # asleep in sleep()
        self.woken = False  # woken while not asleep: the next sleep() returns at once
        self.done = False
        self.expired = False
        self.counts = (0, 0)
        self.error: BaseException | None = None
        self.on_first_read = on_first_read
        self.on_records = on_records
        self.relay_end: RelayEnd | None = None
        self.renewal: Renewal | None = None
        self.offer: Offer | None = None
        self.due = self.settle = False  # renewal work for the relay's task

    def wake(self) -> None:
        """End the task's sleep (it ended, or has renewal work); not async."""
        task = self.task
        if task is None:
            self.woken = True
        else:
            self.task = None
            trio.lowlevel.reschedule(task)

    async def sleep(self) -> None:
        """Until ``wake`` (at once if it came since the last sleep). A cancel point."""
        if self.woken:
            self.woken = False
            await trio.lowlevel.checkpoint()
            return
        self.task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, raise_cancel: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Stoppable(Protocol):
    """What ``Drain`` cancels: a ``trio.CancelScope``, or a relay's ``_RelayStop``."""

    @property
    def cancel_called(self) -> bool: ...

    def cancel(self) -> None: ...


class _RelayStop:
    """A relay's ``Stoppable``: cancelled, it tells the engine to end the relay at its
    next request boundary, from whichever task cancels it; the relay's own task sleeps
    on until the engine reports the end. Not a ``trio.CancelScope``: that would cost
    the relay's task a scope per run and a wake-up to pass the word on."""

    __slots__ = ("_handle", "_relay_stop", "_waiter", "cancel_called")

    def __init__(self, relay_stop: Callable[[int], None], handle: int, waiter: _Waiter) -> None:
        self._relay_stop = relay_stop
        self._handle = handle
        self._waiter = waiter
        self.cancel_called = False

    def cancel(self) -> None:
        if self.cancel_called:
            return
        self.cancel_called = True
        if not self._waiter.done:
            self._relay_stop(self._handle)


class NativePump:
    """One engine for one trio loop. Start ``run`` in a nursery that outlives every
    connection using ``splice``."""

    def __init__(self) -> None:
        assert _pump is not None
        self._engine = _pump.Engine(max_payload=DEFAULT_MAX_PAYLOAD)
        self._waiters: dict[int, _Waiter] = {}
        self.copies = 0  # copies (HTTP bodies) completed
        # exchanges the HTTP relays finished, by status class ("2xx"...; tests read it)
        self.relayed: dict[str, int] = {}

    @property
    def active(self) -> int:
        """Connections the engine pumps now."""
        return len(self._waiters)

    @property
    def held(self) -> int:
        """Bytes the engine read and could not write on yet, over all connections: at
        most one read (64 KiB, or up to 256 KiB in bulk) per direction whose destination
        does not take them."""
        return int(self._engine.held())

    async def run(
        self, *, task_status: trio.TaskStatus[NativePump] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run the engine's thread and wake the connections that end, until cancelled.
        A cancel point; returns only once the engine's thread has stopped."""
        engine = self._engine
        done = engine.done_fileno()
        # Its own limiter: the thread runs for the life of the data plane, and must not
        # take (or wait for) one of trio's default tokens.
        thread = trio.CapacityLimiter(1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(trio.to_thread.run_sync, engine.serve, limiter=thread)
            )
            nursery.start_soon(self._take_records)
            try:
                task_status.started(self)
                while True:
                    await trio.lowlevel.wait_readable(done)
                    ended = engine.collect()
                    self._dispatch_records()  # a relay's records come before its end
                    for handle, status, a_to_b, b_to_a, error_kind, error, relay in ended:
                        self._finished(handle, status, (a_to_b, b_to_a), error_kind, error, relay)
            finally:
                engine.stop()  # serve() returns; the nursery waits for its thread
                trio.lowlevel.notify_closing(done)

    async def _take_records(self) -> None:
        """Hand the relays' records to their connections, in batches (RECORDS_SECONDS)."""
        fd = self._engine.records_fileno()
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                self._dispatch_records()
                await trio.sleep(RECORDS_SECONDS)
        finally:
            trio.lowlevel.notify_closing(fd)

    def _dispatch_records(self) -> None:
        assert _pump is not None
        entries, dropped = self._engine.records()
        if dropped:
            log.warning("relayed requests left out of metrics and access log", count=dropped)
        # by relay, in order: (records, summaries) until a report of its renewal
        batches: dict[int, tuple[list[Record], list[Summary]]] = {}
        relayed, waiters = self.relayed, self._waiters
        for handle, kind, item in entries:
            if kind == _pump.RECORD_RENEW_DUE or kind == _pump.RECORD_SWITCHED:
                self._hand_records(handle, batches.pop(handle, None))
                waiter = waiters.get(handle)
                if waiter is None or waiter.renewal is None:
                    continue
                if kind == _pump.RECORD_RENEW_DUE:
                    waiter.due = True
                else:
                    waiter.renewal.switched(bool(item))
                    waiter.settle = True
                waiter.wake()  # the relay's task does the rest
                continue
            batch = batches.get(handle)
            if batch is None:
                batch = batches[handle] = ([], [])
            if kind == _pump.RECORD_SUMMARY:
                batch[1].append(item)
                for n, count in enumerate(item[0]):
                    if count:
                        status_class = f"{n}xx"
                        relayed[status_class] = relayed.get(status_class, 0) + count
            else:
                batch[0].append(item)
                status_class = f"{item[0] // 100}xx"
                relayed[status_class] = relayed.get(status_class, 0) + 1
        for handle, batch in batches.items():
            self._hand_records(handle, batch)

    def _hand_records(
        self, handle: int, batch: tuple[list[Record], list[Summary]] | None
    ) -> None:
        waiter = self._waiters.get(handle)
        if batch is not None and waiter is not None and waiter.on_records is not None:
            waiter.on_records(*batch)

    def _offer(
        self, handle: int, end: End | Keep | None, add: bytes, notify_first: bool
    ) -> bool:
        try:
            if end is KEEP:
                kept: bool = self._engine.relay_keep(handle)
                return kept
            taken: bool = self._engine.relay_next(handle, end, add=add, notify_first=notify_first)
        except (RuntimeError, TypeError, ValueError, OSError) as exc:
            log_refusal(NEXT_REFUSED, str(exc))
            return False
        return taken

    def _finished(
        self,
        handle: int,
        status: int,
        counts: tuple[int, int],
        error_kind: int,
        error: str,
        relay: tuple[int, bytes, bytes, int, str | None, bytes | None, int] | None = None,
    ) -> None:
        assert _pump is not None
        waiter = self._waiters.get(handle)
        if waiter is None:
            if relay is not None and relay[6] >= 0:
                os.close(relay[6])  # a relay's own connection, its task gone
            return
        if status == _pump.FIRST_READ:
            try:
                if waiter.on_first_read is not None:
                    waiter.on_first_read()
            finally:
                self._engine.resume(handle)
            return
        del self._waiters[handle]
        waiter.done = True
        waiter.counts = counts
        waiter.expired = status == _pump.DONE_IDLE
        if relay is not None and status == _pump.DONE_OK:
            outcome, downstream, response, reusable, upstream_error, request_id, fd = relay
            waiter.relay_end = RelayEnd(
                _OUTCOMES[outcome], downstream, response, bool(reusable), upstream_error,
                request_id, fd,
            )
        if status == _pump.DONE_ERROR:
            waiter.error = _error(waiter.ends, error_kind, error)
        waiter.wake()

    async def splice(
        self,
        a: End,
        b: End,
        *,
        idle_seconds: float,
        on_first_read: Callable[[], None] | None = None,
        either_end: bool = False,
    ) -> tuple[int, int, bool]:
        """Pump between two set-up ends until both directions ended, one failed, or
        ``idle_seconds`` passed without a byte. The caller closes the ends afterwards.
        A cancel point: cancelled, the connection is taken back from the engine.

        Args:
            on_first_read: called once, when the first bytes came from a TLS end (a TLS
                1.3 client has its session ticket by then).
            either_end: done when either direction ended (a tunnel: no half-close).
        Returns:
            (bytes a→b, bytes b→a, whether it ended by idle expiry).
        Raises:
            ConnectionBroken: an end failed; ``a`` is called downstream, ``b`` upstream;
                its cause is a trio.BrokenResourceError or FrameError.
            NativeRefused: the engine would not take an end (before any byte moved).
        """
        assert _pump is not None
        flags = _pump.EITHER_END if either_end else 0
        handle = self._add(a, b, idle_seconds, on_first_read is not None, 0, flags)
        waiter = await self._wait(handle, _Waiter(on_first_read, ends=(DOWNSTREAM, UPSTREAM)))
        return waiter.counts[0], waiter.counts[1], waiter.expired

    async def copy(
        self,
        src: End,
        dst: End,
        size: int,
        *,
        idle_seconds: float,
        until_reply: bool = False,
        ends: tuple[str, str] | None = None,
    ) -> int:
        """Move exactly ``size`` bytes from ``src`` to ``dst`` (an HTTP body of known
        length), then give both ends back as they were: no end of stream is sent, and
        no byte after the ``size`` is read (it belongs to the next message). A cancel
        point: cancelled, the ends are taken back from the engine part way, and are
        fit only to be closed.

        With ``until_reply``, the copy also ends early, with nothing half-written, once
        ``dst`` has something to read (an upstream answering before the request body
        ended); the caller goes on from the count.

        ``ends``: the names of ``src`` and ``dst`` ("downstream", "upstream"): a failure
        is then a ConnectionBroken naming the end.

        Returns:
            the bytes moved: ``size``, or fewer after an early reply.

        Raises:
            trio.BrokenResourceError: an end failed, or ``src`` ended before ``size``
                bytes (a ConnectionBroken, with ``ends``); ConnectionBroken without an
                end: no byte moved for ``idle_seconds``.
            NativeRefused: the engine would not take an end (nothing moved).
        """
        assert _pump is not None
        if size < 1:
            raise ValueError("a copy moves at least one byte")
        flags = _pump.UNTIL_REPLY if until_reply else 0
        handle = self._add(src, dst, idle_seconds, False, size, flags)
        waiter = await self._wait(handle, _Waiter(None, ends=ends))
        if waiter.expired:
            moved = waiter.counts[0]
            raise ConnectionBroken(
                f"no byte moved for {idle_seconds:g}s ({moved} of {size} bytes copied)", None
            )
        self.copies += 1
        return waiter.counts[0]

    async def relay(
        self,
        down: End,
        up: End,
        *,
        idle_seconds: float,
        hold_seconds: float,
        head_seconds: float,
        drop: tuple[bytes, ...],
        add: bytes,
        on_records: OnRecords,
        stop_when: Callable[[Stoppable], AbstractContextManager[object]],
        initial: bytes = b"",
        refuse: tuple[bytes, ...] = (),
        gen_ids: bool = False,
        max_requests: int = 0,
        max_seconds: float = 0,
        on_first_read: Callable[[], None] | None = None,
        summary: tuple[float, ...] | None = None,
        renewal: Renewal | None = None,
        notify_first: bool | None = None,
        reconnect: tuple[str, int, float] | None = None,
    ) -> RelayEnd:
        """Serve HTTP/1.1 requests from ``down`` to ``up`` in C, from a request boundary
        (``initial``: downstream bytes already read), until the engine gives both back
        (see ``RelayEnd`` and the relay's comment in ``_pump.c``). The exchanges it
        finishes go to ``on_records``, in batches, soon after and before this returns:
        one by one (``Record``), or with ``summary`` (ascending latency bounds, seconds)
        summed up (``Summary``, each of up to 64 exchanges or 50 ms), when no one needs
        them one by one (no access log): Python's cost per request is then nil.

        Args:
            drop: names of fields dropped from each request (besides the hop-by-hop ones).
            add: field lines (``b"Name: value\\r\\n"``...) added to each request, last.
            refuse: names of fields that leave a request to Python.
            gen_ids: add ``x-request-id`` and ``traceparent`` to requests without them
                (random, as ``http_outbound`` does), before ``add``.
            max_requests: end (``RENEW``) after this many exchanges (0: no limit).
            max_seconds: end (``RENEW``) at the first boundary this long after the start
                (0: no limit).
            renewal: instead of ending at ``max_requests`` or ``max_seconds``, go on
                with the next upstream it offers (see ``Renewal``); then those bound a
                block of requests to one upstream, from the switch.
            on_first_read: called once, when the first bytes came from ``up`` (a TLS
                client: a TLS 1.3 session ticket comes with them), as for ``splice``;
                with ``renewal``, also for each upstream offered with ``notify_first``.
            notify_first: whether ``up``'s first bytes are reported (default: when
                ``on_first_read`` is given).
            reconnect: (IP address, port, connect seconds) of a plain ``up``'s app: when
                an exchange leaves it spent (the app closed it), the relay connects there
                itself as the next request begins, and goes on (``RelayEnd.upstream_fd``);
                a connect that fails ends it ``UPSTREAM_SPENT`` with why, as do more than
                64 connects at once in this engine (without why). Not with ``renewal``.
            hold_seconds: the relay ends (``RELAY_IDLE``) after this long between requests.
            head_seconds: a request head's time, from its first byte (``RELAY_HEAD_TIMEOUT``).
            stop_when: registers a ``Stoppable`` (``Drain.idle``): when it is cancelled,
                the relay ends at its next request boundary (at once if it waits for
                one).

        Raises:
            ConnectionBroken: a side failed once the response head went down (``down``
                is called downstream, ``up`` upstream), or no byte moved for
                ``idle_seconds`` inside an exchange (no end).
            NativeRefused: the engine would not take an end (nothing moved).
        """
        try:
            handle = self._engine.relay(
                down[0], down[1], down[2], up[0], up[1], up[2], idle_seconds, hold_seconds,
                head_seconds, drop=drop, add=add, initial=initial, refuse=refuse,
                gen_ids=gen_ids, max_requests=max_requests, max_seconds=max_seconds,
                notify_first=on_first_read is not None if notify_first is None else notify_first,
                summary=summary,
                renew_ahead=renewal is not None,
                reconnect=reconnect,
            )
        except (RuntimeError, TypeError, ValueError, OSError) as exc:
            raise NativeRefused(str(exc)) from exc
        waiter = _Waiter(on_first_read, on_records, ends=(DOWNSTREAM, UPSTREAM))
        if renewal is not None:
            waiter.renewal = renewal
            waiter.offer = functools.partial(self._offer, handle)
        waiter = await self._wait(handle, waiter, stop_when)
        if waiter.relay_end is None or waiter.expired:
            raise ConnectionBroken(
                f"no byte moved for {idle_seconds:g}s in the middle of an HTTP exchange", None
            )
        return waiter.relay_end

    @staticmethod
    async def _until_done(waiter: _Waiter) -> None:
        """Wait for the end, doing a relay's renewal work on the way."""
        while True:
            await waiter.sleep()
            if waiter.done:
                return
            renewal = waiter.renewal
            assert renewal is not None and waiter.offer is not None
            if waiter.settle:
                waiter.settle = False
                renewal.settle()
            if waiter.due:
                waiter.due = False
                await renewal.renew(waiter.offer)

    def _add(
        self, a: End, b: End, idle_seconds: float, first_read: bool, limit: int, flags: int
    ) -> int:
        """Hand a and b to the engine (a splice, or a copy with ``limit``): its handle."""
        try:
            handle: int = self._engine.add(
                a[0], a[1], a[2], b[0], b[1], b[2], idle_seconds, first_read, limit, flags
            )
        except (RuntimeError, TypeError, ValueError, OSError) as exc:
            raise NativeRefused(str(exc)) from exc
        return handle

    async def _wait(
        self,
        handle: int,
        waiter: _Waiter,
        stop_when: Callable[[Stoppable], AbstractContextManager[object]] | None = None,
    ) -> _Waiter:
        """Wait for the end of what the engine runs as ``handle``; raise what it failed
        with (with the waiter's ``ends``, the names of a and b: a ConnectionBroken naming
        the end). Cancelled, it is taken back from the engine. ``stop_when`` (a relay):
        once the stop it registers is cancelled, the relay stops at its next boundary,
        and this waits for that."""
        self._waiters[handle] = waiter
        try:
            if stop_when is None:
                await self._until_done(waiter)
            else:
                with stop_when(_RelayStop(self._engine.relay_stop, handle, waiter)):
                    await self._until_done(waiter)
        finally:
            if not waiter.done:
                del self._waiters[handle]
                self._engine.remove(handle)
        if waiter.error is not None:
            raise waiter.error
        return waiter
