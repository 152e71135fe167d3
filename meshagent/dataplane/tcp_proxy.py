"""Splice two byte streams: two pumps, half-close, backpressure, idle timeout.

Theory of operation. Each direction is one pump (one in the connection's own task, the
other in a child task, so an idle connection costs two tasks): receive at most ``CHUNK`` bytes,
send them all, repeat. A pump holds at most one chunk, and does not read again until the
other side took the last one, so a slow reader slows the writer instead of growing a
buffer (backpressure by construction). End of stream in one direction becomes a
half-close on the other side (``send_eof``): a TCP FIN for the app, an END frame between
agents. Both streams close when both directions ended, when one side fails, or when no
byte moved in either direction for ``idle_seconds``.
"""

from __future__ import annotations

from typing import Protocol

import trio

from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.sslsocket import SslSocketStream
from meshagent.protocol.frames import END_FRAME, FrameDecoder, FrameError, encode_data

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
        await trio.aclose_forcefully(self.stream)


class PlainSide(_StreamSide):
    """A TCP connection to or from a local app; half-close is a FIN. The socket is
    called directly (``PlainSocketStream``), which takes the descriptor over from the
    ``trio.SocketStream``."""

    __slots__ = ()

    def __init__(self, stream: trio.SocketStream | PlainSocketStream) -> None:
        super().__init__(
            stream if isinstance(stream, PlainSocketStream) else PlainSocketStream.wrap(stream)
        )

    async def send_eof(self) -> None:
        stream = self.stream
        assert isinstance(stream, PlainSocketStream)
        await stream.send_eof()


class FramedSide:
    """An mTLS connection to another agent that negotiated ``meshagent/1`` framing."""

    __slots__ = ("_decoder", "_pending", "stream")

    def __init__(self, stream: SslSocketStream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._pending: list[bytes] = []

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

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


class RawTlsSide(_StreamSide):
    """An mTLS connection whose peer did not negotiate framing (a mesh-aware client that
    is not an agent). TLS cannot half-close here: the end of the other direction is not
    passed on; the connection closes when both directions are done or idle."""

    __slots__ = ()

    async def send_eof(self) -> None:
        return


async def splice(a: Side, b: Side, *, idle_seconds: float) -> tuple[int, int]:
    """Pump bytes both ways until both directions end; close both sides. A cancel point.

    Returns:
        (bytes a→b, bytes b→a).
    Raises:
        whatever a side raises (OSError, trio.BrokenResourceError, FrameError); both
        sides are closed either way. Idle expiry is not an error: it returns.
    """
    counts = [0, 0]
    with trio.CancelScope() as idle:
        idle.deadline = trio.current_time() + idle_seconds

        async def pump(src: Side, dst: Side, slot: int) -> None:
            while True:
                data = await src.receive()
                if not data:
                    await dst.send_eof()
                    return
                await dst.send(data)
                counts[slot] += len(data)
                idle.deadline = trio.current_time() + idle_seconds

        try:
            # One pump runs in this task: a connection costs two tasks, not three.
            async with trio.open_nursery() as pumps:
                pumps.start_soon(pump, b, a, 1)
                await pump(a, b, 0)
        finally:
            with trio.CancelScope(shield=True):
                await a.aclose()
                await b.aclose()
    return counts[0], counts[1]
