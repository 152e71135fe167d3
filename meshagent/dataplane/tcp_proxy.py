"""Splice two byte streams: two pumps, half-close, backpressure, idle timeout.

Theory of operation. Each direction is one pump (one in the connection's own task, the
other in a child task, so an idle connection costs two tasks): receive at most ``CHUNK`` bytes,
send them all, repeat. A pump holds at most one chunk, and does not read again until the
other side took the last one, so a slow reader slows the writer instead of growing a
buffer (backpressure by construction). End of stream in one direction becomes a
half-close on the other side (``send_eof``): a TCP FIN for the app, an END frame between
agents. Both streams close when both directions ended, when one side fails, or when no
byte moved in either direction for ``idle_seconds``.

Where it can, ``splice`` hands both sockets to the C pump instead (``nativepump.py``),
which keeps these rules in C; the Python pumps here are the reference and the fallback
(no C extension, ``MESHAGENT_NATIVE_PUMP=0``, or a side the engine refuses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from meshagent.dataplane import nativepump
from meshagent.dataplane.errors import (
    DOWNSTREAM,
    STREAM_ERRORS,
    UPSTREAM,
    ConnectionBroken,
    describe_failure,
)
from meshagent.dataplane.nativepump import End, NativePump, NativeRefused
from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.sslsocket import SslSocketStream, close_now
from meshagent.log import get_logger
from meshagent.protocol.frames import (
    END_FRAME,
    HEADER_BYTES,
    FrameDecoder,
    FrameError,
    check_control,
    encode_data,
)

log = get_logger("dataplane")

CHUNK = 64 * 1024


class Side(Protocol):
    """One end of a proxied connection, as the pumps see it."""

    async def receive(self) -> bytes | bytearray:
        """Up to CHUNK bytes; b"" at end of stream. A cancel point."""
        ...

    async def send(self, data: bytes | bytearray) -> None:
        """All of ``data``; waits while the peer is slow (backpressure). A cancel point."""
        ...

    async def send_eof(self) -> None:
        """Half-close: nothing more will be sent. A cancel point."""
        ...

    async def aclose(self) -> None: ...

    def native_end(self) -> End | None:
        """What the C pump needs to take this side over, or None if it cannot."""
        ...


class _StreamSide:
    """Bytes straight through to a trio stream."""

    __slots__ = ("stream",)

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def receive(self) -> bytes | bytearray:
        return await self.stream.receive_some(CHUNK)

    async def send(self, data: bytes | bytearray) -> None:
        await self.stream.send_all(data)

    async def aclose(self) -> None:
        await close_now(self.stream)


class PlainSide(_StreamSide):
    """A TCP connection to or from a local app; half-close is a FIN."""

    __slots__ = ()

    def __init__(self, stream: PlainSocketStream) -> None:
        super().__init__(stream)

    async def send_eof(self) -> None:
        stream = self.stream
        assert isinstance(stream, PlainSocketStream)
        await stream.send_eof()

    def native_end(self) -> End | None:
        return nativepump.stream_end(self.stream)


class FramedSide:
    """An mTLS connection to another agent that negotiated framing (``meshagent/1`` or
    ``/2``). With ``keep`` (``meshagent/2``), closing it leaves the connection open when
    the stream ended cleanly (``reusable``): the caller keeps it for the next stream."""

    __slots__ = ("_decoder", "_end_sent", "_pending", "ended_natively", "keep", "stream")

    def __init__(self, stream: SslSocketStream, *, keep: bool = False) -> None:
        self.stream = stream
        self.keep = keep
        self._decoder = FrameDecoder()
        self._pending: list[bytes] = []
        self._end_sent = False
        self.ended_natively = False  # the C pump saw both directions end (not idle)

    @property
    def reusable(self) -> bool:
        """Both directions ended (END frames) and nothing failed: the connection may
        carry another stream."""
        if self.ended_natively:
            return True
        return self._decoder.ended and self._end_sent and not self._pending

    async def receive(self) -> bytes | bytearray:
        while not self._pending:
            if self._decoder.ended:
                return b""
            data = await self.stream.receive_some(CHUNK)
            if not data:
                if self._decoder.buffered():
                    raise FrameError("connection closed inside a frame")
                return b""  # closed without END: treat as end of stream
            self._pending = self._decoder.feed(data)
            self._pending.reverse()
        return self._pending.pop()

    async def send(self, data: bytes | bytearray) -> None:
        await self.stream.send_all(encode_data(data))

    async def send_eof(self) -> None:
        await self.stream.send_all(END_FRAME)
        self._end_sent = True

    async def aclose(self) -> None:
        if self.keep and self.reusable:
            return  # the caller keeps the connection for its next stream
        await close_now(self.stream)

    def native_end(self) -> End | None:
        if self._pending or self._decoder.buffered() or self._decoder.ended:
            return None  # mid-stream: the decoder state stays in Python
        return nativepump.stream_end(self.stream, framed=True)


class RawTlsSide(_StreamSide):
    """An mTLS connection whose peer did not negotiate framing (a mesh-aware client that
    is not an agent). TLS cannot half-close here: the end of the other direction is not
    passed on; the connection closes when both directions are done or idle."""

    __slots__ = ()

    async def send_eof(self) -> None:
        return

    def native_end(self) -> End | None:
        return nativepump.stream_end(self.stream)


async def splice(
    a: Side, b: Side, *, idle_seconds: float, pump: NativePump | None = None
) -> tuple[int, int]:
    """Pump bytes both ways until both directions end; close both sides. A cancel point.

    With ``pump`` (the C pump, see nativepump.py), the bytes move in C when both sides
    allow it; the behaviour is the same.

    ``a`` is the downstream end (the connection made to this agent), ``b`` the upstream.

    Returns:
        (bytes a→b, bytes b→a).
    Raises:
        ConnectionBroken: a side failed (its ``end`` says which; the cause is what it
            raised: OSError, trio.BrokenResourceError or FrameError). Both sides are
            closed either way. Idle expiry is not an error: it returns.
    """
    try:
        if pump is not None:
            counts = await _splice_natively(pump, a, b, idle_seconds)
            if counts is not None:
                return counts
        return await _splice_in_python(a, b, idle_seconds)
    finally:
        with trio.CancelScope(shield=True):
            await a.aclose()
            await b.aclose()


async def _splice_natively(
    pump: NativePump, a: Side, b: Side, idle_seconds: float
) -> tuple[int, int] | None:
    """The C pump's splice, or None when a side cannot go there or the engine refused
    it (nothing moved: the Python pumps take it)."""
    ends = a.native_end(), b.native_end()
    if ends[0] is None or ends[1] is None:
        return None
    try:
        a_to_b, b_to_a, expired = await pump.splice(
            ends[0], ends[1], idle_seconds=idle_seconds, on_first_read=_first_read(a, b)
        )
    except NativeRefused as exc:
        nativepump.log_refusal(
            "l4 pump refused a connection; pumping it in Python (logged once)", str(exc)
        )
        return None
    if not expired:
        for side in (a, b):
            if isinstance(side, FramedSide):
                side.ended_natively = True
    return a_to_b, b_to_a


async def _splice_in_python(a: Side, b: Side, idle_seconds: float) -> tuple[int, int]:
    """The two pumps of the module docstring; the caller closes the sides."""
    counts = [0, 0]
    with trio.CancelScope() as idle:
        idle.deadline = trio.current_time() + idle_seconds

        async def move(src: Side, dst: Side, slot: int) -> None:
            ends = (DOWNSTREAM, UPSTREAM) if slot == 0 else (UPSTREAM, DOWNSTREAM)
            while True:  # as broken_at does, without a context manager per chunk
                try:
                    data = await src.receive()
                except STREAM_ERRORS as exc:
                    raise ConnectionBroken(describe_failure(exc), ends[0]) from exc
                try:
                    if not data:
                        await dst.send_eof()
                        return
                    await dst.send(data)
                except STREAM_ERRORS as exc:
                    raise ConnectionBroken(describe_failure(exc), ends[1]) from exc
                counts[slot] += len(data)
                idle.deadline = trio.current_time() + idle_seconds

        # One pump runs in this task: a connection costs two tasks, not three.
        async with trio.open_nursery() as pumps:
            pumps.start_soon(move, b, a, 1)
            await move(a, b, 0)
    return counts[0], counts[1]


def _first_read(a: Side, b: Side) -> Callable[[], None] | None:
    """The session offer of a TLS client side still waiting for its first bytes."""
    for side in (a, b):
        stream = getattr(side, "stream", None)
        if isinstance(stream, SslSocketStream) and stream.wants_first_read:
            return stream.first_read
    return None


async def receive_control(stream: SslSocketStream, kind: int) -> bool:
    """Read the header-only frame ``kind`` (OPEN or OPENED, ``meshagent/2``) and nothing
    after it. False when the connection ended cleanly before it. A cancel point.

    Raises:
        FrameError: another frame, or the connection ended inside it.
        trio.BrokenResourceError: as ``SslSocketStream.receive_some``.
    """
    header = b""
    while len(header) < HEADER_BYTES:
        data = await stream.receive_some(HEADER_BYTES - len(header))
        if not data:
            if header:
                raise FrameError("connection closed inside a frame")
            return False
        header += data
    check_control(header, kind)
    return True
