"""The C pump (meshagent/_pump.c through nativepump.NativePump) on real loopback
sockets with real mTLS: the same behaviour as tcp_proxy's Python pumps — bytes both
ways, half-close, framing and its checks, close_notify, resets, idle expiry,
cancellation, backpressure, TLS session offers, many connections on one engine."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from meshagent.dataplane.errors import ConnectionBroken
from meshagent.dataplane.nativepump import (
    ENV_SWITCH,
    End,
    NativePump,
    NativeRefused,
    stream_end,
)
from meshagent.dataplane.sslsocket import SslSocketStream
from meshagent.dataplane.tcp_proxy import (
    FramedSide,
    PlainSide,
    RawTlsSide,
    Side,
    receive_control,
    splice,
)
from meshagent.protocol.frames import (
    END_FRAME,
    OPEN,
    OPEN_FRAME,
    FrameDecoder,
    FrameError,
    encode_data,
)
from tests.support.net import plain_stream
from tests.support.tls import Contexts, tcp_pair, tls_pair

if os.environ.get(ENV_SWITCH) == "0":
    pytest.skip(f"the C pump is turned off by {ENV_SWITCH}=0", allow_module_level=True)


@dataclass
class Link:
    """app (the test, plain TCP) <-> [plain side | pump | TLS side] <-> agent (the test,
    the other agent's end of the mTLS connection)."""

    app: trio.SocketStream
    plain: PlainSide
    tls: SslSocketStream  # the pumped TLS end
    agent: SslSocketStream


@asynccontextmanager
async def link(
    contexts: Contexts, *, tls_is_client: bool = False, on_session: object = None
) -> AsyncIterator[Link]:
    app, proxy_plain = await tcp_pair()
    async with tls_pair(
        contexts, on_session=on_session  # type: ignore[arg-type]
    ) as (server, client):
        pumped, agent = (client, server) if tls_is_client else (server, client)
        plain = PlainSide(plain_stream(proxy_plain))
        try:
            yield Link(app, plain, pumped, agent)
        finally:
            for stream in (app, plain.stream):
                await trio.aclose_forcefully(stream)


async def _read_frames(agent: SslSocketStream) -> tuple[bytes, bool]:
    """Everything the agent end receives until END (True) or close (False)."""
    decoder = FrameDecoder()
    out = bytearray()
    while not decoder.ended:
        data = await agent.receive_some(65536)
        if not data:
            return bytes(out), False
        for payload in decoder.feed(data):
            out += payload
    return bytes(out), True


async def _read_all(stream: trio.SocketStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


class Outcome:
    def __init__(self) -> None:
        self.counts: tuple[int, int] | None = None
        self.error: BaseException | None = None
        self.done = trio.Event()


async def _splice(
    outcome: Outcome, a: Side, b: Side, pump: NativePump | None, idle: float = 30
) -> None:
    try:
        outcome.counts = await splice(a, b, idle_seconds=idle, pump=pump)
    except* ConnectionBroken as group:  # the Python pumps' nursery groups it
        (outcome.error,) = group.exceptions
    finally:
        outcome.done.set()


def failed(outcome: Outcome, end: str, cause: type[Exception], text: str) -> None:
    """The splice failed at ``end`` with ``cause``, and says so."""
    error = outcome.error
    assert isinstance(error, ConnectionBroken), error
    assert error.end == end and isinstance(error.__cause__, cause), (error, error.__cause__)
    assert str(error).startswith(f"{end}: ") and text in str(error)


@pytest.fixture(params=["c", "python"])
async def either(request: pytest.FixtureRequest, pump: NativePump) -> NativePump | None:
    """The C pump, or None: the Python pumps (the reference, with the same errors)."""
    return pump if request.param == "c" else None


@asynccontextmanager
async def spliced(
    contexts: Contexts,
    pump: NativePump | None,
    *,
    side: Callable[[SslSocketStream], Side] = FramedSide,
    idle: float = 30,
    tls_is_client: bool = False,
    on_session: object = None,
) -> AsyncIterator[tuple[Link, Outcome, trio.Nursery]]:
    """A link whose plain side and TLS side (as ``side``) the C pump splices, in a
    nursery that waits for the splice at the end (cancel it to stop sooner)."""
    async with (
        link(contexts, tls_is_client=tls_is_client, on_session=on_session) as ln,
        trio.open_nursery() as nursery,
    ):
        outcome = Outcome()
        nursery.start_soon(_splice, outcome, ln.plain, side(ln.tls), pump, idle)
        yield ln, outcome, nursery


@pytest.mark.parametrize("frame", [70001, 262140], ids=["odd-frames", "big-frames"])
async def test_bytes_both_ways_at_once_then_half_close(
    contexts: Contexts, pump: NativePump, frame: int
) -> None:
    # Big frames (the most a BIG_CHUNK read makes) have the engine wait for most of a
    # frame at once (SO_RCVLOWAT): every byte still arrives.
    size = 8 << 20
    up, down = os.urandom(size), os.urandom(size)
    got: dict[str, object] = {}
    async with link(contexts) as ln:
        outcome = Outcome()

        async def app_side() -> None:
            async with trio.open_nursery() as n:
                async def send() -> None:
                    await ln.app.send_all(up)
                    await ln.app.send_eof()
                n.start_soon(send)
                got["app"] = await _read_all(ln.app)

        async def agent_side() -> None:
            async with trio.open_nursery() as n:
                async def send() -> None:
                    for i in range(0, size, frame):
                        await ln.agent.send_all(encode_data(down[i : i + frame]))
                    await ln.agent.send_all(END_FRAME)
                n.start_soon(send)
                got["agent"] = await _read_frames(ln.agent)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_splice, outcome, ln.plain, FramedSide(ln.tls), pump)
                nursery.start_soon(app_side)
                nursery.start_soon(agent_side)
        assert outcome.error is None
        assert got["app"] == down
        assert got["agent"] == (up, True)
        assert outcome.counts == (size, size)
        assert pump.active == 0


async def test_half_close_crosses_and_the_other_direction_goes_on(
    contexts: Contexts, pump: NativePump
) -> None:
    async with spliced(contexts, pump) as (ln, outcome, _nursery):
        with trio.fail_after(5):
            await ln.app.send_all(b"request")
            await ln.app.send_eof()
            assert await _read_frames(ln.agent) == (b"request", True)
            # the app half-closed; the answer still comes back to it
            await ln.agent.send_all(encode_data(b"answer") + END_FRAME)
            assert await _read_all(ln.app) == b"answer"
            await outcome.done.wait()
    assert outcome.error is None
    assert outcome.counts == (7, 6)


async def test_a_fin_that_came_while_the_pump_waited_is_not_lost(
    contexts: Contexts, pump: NativePump
) -> None:
    # The agent end does not read at first, so the pump waits to write; meanwhile the
    # app's last bytes and its FIN arrive (one readiness edge for both). The last read
    # is short because the FIN stops it: it must not be taken for "socket empty, wait".
    payload = os.urandom(32 << 20)
    async with spliced(contexts, pump) as (ln, _outcome, nursery):

        async def send() -> None:
            await ln.app.send_all(payload)
            await ln.app.send_eof()

        nursery.start_soon(send)
        await trio.sleep(0.5)
        with trio.fail_after(10):
            assert await _read_frames(ln.agent) == (payload, True)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x07\x00\x00\x01x", "unknown frame type 0x07"),
        (b"\x01\x00\x00\x00", "empty DATA frame"),
        (b"\x02\x00\x00\x01x", "END frame with a payload"),
        (b"\x01\x04\x00\x01", "exceeds the limit of 262144"),
        (END_FRAME + b"\x01\x00\x00\x01x", "data after END frame"),
    ],
)
async def test_bad_framing_fails_the_connection(
    contexts: Contexts, pump: NativePump, either: NativePump | None, wire: bytes, message: str
) -> None:
    async with spliced(contexts, either) as (ln, outcome, _nursery):
        with trio.fail_after(5):
            await ln.agent.send_all(encode_data(b"fine"))
            assert await ln.app.receive_some(100) == b"fine"
            await ln.agent.send_all(wire)
            await outcome.done.wait()
            assert await _read_all(ln.app) == b""  # closed
    failed(outcome, "upstream", FrameError, message)
    assert pump.active == 0


async def test_close_notify_inside_a_frame_is_an_error(
    contexts: Contexts, either: NativePump | None
) -> None:
    async with spliced(contexts, either) as (ln, outcome, _nursery):
        with trio.fail_after(5):
            await ln.agent.send_all(b"\x01\x00\x00\x0aabc")  # 3 of 10 bytes
            await ln.agent.aclose()  # sends close_notify
            await outcome.done.wait()
    failed(outcome, "upstream", FrameError, "connection closed inside a frame")


async def test_eof_without_close_notify_is_an_error(
    contexts: Contexts, either: NativePump | None
) -> None:
    async with spliced(contexts, either) as (ln, outcome, _nursery):
        with trio.fail_after(5):
            await ln.agent.send_all(encode_data(b"x"))
            await ln.app.send_all(b"y")  # read all the agent end was sent (tickets
            assert await ln.agent.receive_some(100) == encode_data(b"y")  # too): a FIN
            # the peer dies: TCP FIN, no close_notify
            os.close(ln.agent.ssl_object.detach())
            await outcome.done.wait()
    failed(outcome, "upstream", trio.BrokenResourceError, "without close_notify")


async def test_a_reset_from_the_app_is_an_error(
    contexts: Contexts, either: NativePump | None
) -> None:
    async with spliced(contexts, either) as (ln, outcome, _nursery):
        with trio.fail_after(5):
            await ln.app.send_all(b"x")
            assert await ln.agent.receive_some(100)
            ln.app.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            await ln.app.aclose()  # RST
            await outcome.done.wait()
    failed(outcome, "downstream", trio.BrokenResourceError, "connection reset by peer")


async def test_idle_connections_end_without_error(contexts: Contexts, pump: NativePump) -> None:
    async with spliced(contexts, pump, idle=0.3) as (ln, outcome, _nursery):
        with trio.fail_after(5):
            await ln.app.send_all(b"hello")
            assert await ln.agent.receive_some(100) == encode_data(b"hello")
            start = trio.current_time()
            await outcome.done.wait()
            assert trio.current_time() - start >= 0.25
            assert await _read_all(ln.app) == b""  # closed by the splice
    assert outcome.error is None
    assert outcome.counts == (5, 0)
    assert pump.active == 0


async def test_a_shorter_idle_added_later_still_expires_on_time(pump: NativePump) -> None:
    # The engine's timer is armed for the 30 s connection first; the 0.3 s one added
    # after it must re-arm it earlier.
    async with trio.open_nursery() as nursery:
        long_a, long_pa = await tcp_pair()
        long_pb, long_b = await tcp_pair()
        nursery.start_soon(_splice, Outcome(), PlainSide(plain_stream(long_pa)), PlainSide(plain_stream(long_pb)), pump, 30)
        with trio.fail_after(3):
            while pump.active < 1:  # the 30 s connection is in the engine first
                await trio.sleep(0.01)
        a, pa = await tcp_pair()
        pb, b = await tcp_pair()
        short = Outcome()
        nursery.start_soon(_splice, short, PlainSide(plain_stream(pa)), PlainSide(plain_stream(pb)), pump, 0.3)
        with trio.fail_after(3):
            await short.done.wait()
        assert short.counts == (0, 0) and short.error is None
        assert pump.active == 1
        nursery.cancel_scope.cancel()
    for stream in (long_a, long_b, a, b):
        await stream.aclose()


async def test_bytes_flow_while_the_trio_loop_is_busy(pump: NativePump) -> None:
    # The engine's thread moves the bytes without the trio loop: while the loop is
    # stuck in Python work (a blocking sleep here), a ping crosses the splice and back.
    a, pa = await tcp_pair()
    pb, b = await tcp_pair()
    outcome = Outcome()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_splice, outcome, PlainSide(plain_stream(pa)), PlainSide(plain_stream(pb)), pump)
        await trio.sleep(0.2)
        near = socket.socket(fileno=os.dup(a.socket.fileno()))
        far = socket.socket(fileno=os.dup(b.socket.fileno()))
        near.setblocking(True)
        far.setblocking(True)
        near.settimeout(10)
        far.settimeout(10)
        stalled = threading.Event()
        seen: list[tuple[bytes, bool]] = []

        def peers() -> None:
            stalled.wait(10)
            near.sendall(b"ping")
            got = far.recv(100)
            far.sendall(b"pong")
            back = near.recv(100)
            seen.append((got + back, stalled.is_set()))

        thread = threading.Thread(target=peers)
        thread.start()
        stalled.set()
        deadline = time.monotonic() + 2.0
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251 -- the trio loop must not run: on purpose
        stalled.clear()
        thread.join(10)
        near.close()
        far.close()
        assert seen == [(b"pingpong", True)]
        nursery.cancel_scope.cancel()
    for stream in (a, b):
        await stream.aclose()


async def test_cancelling_takes_the_connection_back(contexts: Contexts, pump: NativePump) -> None:
    async with link(contexts) as ln:
        with trio.move_on_after(0.3):
            await splice(ln.plain, FramedSide(ln.tls), idle_seconds=30, pump=pump)
        assert pump.active == 0
        with trio.fail_after(5):
            assert await _read_all(ln.app) == b""  # both sides were closed
        assert ln.tls.fileno() == -1


async def test_a_slow_reader_holds_the_writer_back(contexts: Contexts, pump: NativePump) -> None:
    # The app never reads: what the agent end can send is bounded by the socket buffers
    # on the way plus one read in the pump, not by the 64 MiB it tries to send.
    sent = 0
    async with spliced(contexts, pump) as (ln, _outcome, nursery):
        frame = encode_data(b"z" * 65536)
        with trio.move_on_after(2):
            while sent < 64 << 20:
                await ln.agent.send_all(frame)
                sent += 65536
        assert sent < 40 << 20, f"the pump took {sent} bytes from a peer nobody reads"
        nursery.cancel_scope.cancel()


async def test_records_that_came_with_their_end_go_on_whole(
    contexts: Contexts, pump: NativePump
) -> None:
    # Many records and the END frame wait in the socket before the pump starts: the
    # engine reads on from the first record into the same chunk, and stops at the end.
    payload = os.urandom(40_000)
    async with link(contexts) as ln:
        for i in range(0, len(payload), 1000):  # a TLS record per frame
            await ln.agent.send_all(encode_data(payload[i : i + 1000]))
        await ln.agent.send_all(END_FRAME)
        outcome = Outcome()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_splice, outcome, ln.plain, FramedSide(ln.tls), pump)
                assert await _read_all(ln.app) == payload
                await ln.app.send_eof()
                assert await _read_frames(ln.agent) == (b"", True)
    assert outcome.error is None
    assert outcome.counts == (0, len(payload))


@pytest.mark.parametrize("native", [True, False], ids=["c-pump", "python-pumps"])
@pytest.mark.parametrize("app_first", [True, False], ids=["app-closes-first", "caller-first"])
async def test_the_next_streams_open_after_an_end_is_left_for_python(
    contexts: Contexts, pump: NativePump, app_first: bool, native: bool
) -> None:
    # meshagent/2: a caller sends OPEN for its next stream as soon as both directions of
    # the last one ended. When the app closed first (an HTTP server answering
    # `Connection: close`), the caller's END and that OPEN can wait in the socket
    # together: the engine must stop at the END (the stream is over) and leave the OPEN,
    # a record of its own, to Python's next receive_control; reading on would take it
    # for bytes after END and fail the connection.
    async with link(contexts) as ln:
        if app_first:
            await ln.app.send_all(b"answer")
            await ln.app.send_eof()
        await ln.agent.send_all(encode_data(b"question"))
        await ln.agent.send_all(END_FRAME)
        if app_first:
            await ln.agent.send_all(OPEN_FRAME)  # the caller saw the answer's END first
        outcome = Outcome()
        mesh_side = FramedSide(ln.tls, keep=True)
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _splice, outcome, mesh_side, ln.plain, pump if native else None
                )
                assert await _read_all(ln.app) == b"question"
                if not app_first:
                    await ln.app.send_all(b"answer")
                    await ln.app.send_eof()
                assert await _read_frames(ln.agent) == (b"answer", True)
                if not app_first:
                    await ln.agent.send_all(OPEN_FRAME)
            assert outcome.error is None, outcome.error
            assert mesh_side.reusable
            assert await receive_control(ln.tls, OPEN)
    assert outcome.counts == (8, 6)


async def test_bytes_before_an_eof_without_close_notify_still_go_on(
    contexts: Contexts, pump: NativePump
) -> None:
    # Records, then a FIN with no close_notify, all waiting before the pump starts: the
    # read that finds the bad end comes after bytes read in the same pass, which go on
    # to the app first; then the connection fails. (The agent end is the TLS server:
    # it has no unread session ticket that would make its close a reset.)
    payload = os.urandom(40_000)
    async with link(contexts, tls_is_client=True) as ln:
        for i in range(0, len(payload), 1000):
            await ln.agent.send_all(encode_data(payload[i : i + 1000]))
        os.close(ln.agent.ssl_object.detach())
        outcome = Outcome()
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_splice, outcome, ln.plain, FramedSide(ln.tls), pump)
                got = bytearray()
                while len(got) < len(payload):
                    data = await ln.app.receive_some(65536)
                    assert data, f"the app got {len(got)} of {len(payload)} bytes, then EOF"
                    got += data
                await outcome.done.wait()
    assert bytes(got) == payload
    failed(outcome, "upstream", trio.BrokenResourceError, "without close_notify")


@pytest.mark.parametrize("towards", ["app", "agent"])
async def test_a_reader_that_stops_leaves_at_most_a_chunk_in_the_pump(
    contexts: Contexts, pump: NativePump, towards: str
) -> None:
    # Read fast first, so the pump reads in bulk (up to BIG_CHUNK at once), then stop:
    # the pump stops reading (it holds what the reader did not take) and holds no more
    # than one bulk read.
    from meshagent.dataplane._pump import BIG_CHUNK

    fast = 16 << 20
    block = os.urandom(256 << 10)
    async with spliced(contexts, pump) as (ln, _outcome, nursery):
        if towards == "app":
            frame = encode_data(block)

            async def send() -> None:
                await ln.agent.send_all(frame)

            async def read_fast() -> None:
                seen = 0
                while seen < fast:
                    seen += len(await ln.app.receive_some(1 << 20))
        else:

            async def send() -> None:
                await ln.app.send_all(block)

            async def read_fast() -> None:
                decoder, seen = FrameDecoder(), 0
                while seen < fast:
                    for payload in decoder.feed(await ln.agent.receive_some(1 << 20)):
                        seen += len(payload)

        async def send_on() -> None:
            while True:
                await send()

        with trio.fail_after(30):
            async with trio.open_nursery() as readers:
                readers.start_soon(read_fast)
                for _ in range(fast // len(block) + 1):
                    await send()
            nursery.start_soon(send_on)  # the reader has stopped
            while pump.held == 0:  # until the pump holds what nobody takes
                await trio.sleep(0.005)
        assert pump.held <= BIG_CHUNK
        nursery.cancel_scope.cancel()


async def test_raw_tls_side_does_not_pass_a_half_close(contexts: Contexts, pump: NativePump) -> None:
    async with spliced(contexts, pump, side=RawTlsSide) as (ln, outcome, _nursery):
        with trio.fail_after(5):
            await ln.app.send_all(b"raw bytes")
            await ln.app.send_eof()
            assert await ln.agent.receive_some(100) == b"raw bytes"
            await ln.agent.send_all(b"back")
            assert await ln.app.receive_some(100) == b"back"
            await ln.agent.aclose()  # close_notify: the app's direction ends
            assert await _read_all(ln.app) == b""
            await outcome.done.wait()
    assert outcome.error is None
    assert outcome.counts == (9, 4)


async def test_plain_to_plain(pump: NativePump) -> None:
    app, proxy_a = await tcp_pair()
    proxy_b, far = await tcp_pair()
    outcome = Outcome()
    async with app, far, trio.open_nursery() as nursery:
        nursery.start_soon(_splice, outcome, PlainSide(plain_stream(proxy_a)), PlainSide(plain_stream(proxy_b)), pump)
        with trio.fail_after(5):
            await app.send_all(b"ping")
            await app.send_eof()
            assert await _read_all(far) == b"ping"
            await far.send_all(b"pong")
            await far.send_eof()
            assert await _read_all(app) == b"pong"
            await outcome.done.wait()
    assert outcome.counts == (4, 4)


async def test_a_tunnel_ends_with_either_direction(pump: NativePump) -> None:
    app, proxy_a = await tcp_pair()
    proxy_b, far = await tcp_pair()
    side_a, side_b = PlainSide(plain_stream(proxy_a)), PlainSide(plain_stream(proxy_b))
    async with app, far, side_a.stream, side_b.stream:
        a, b = _end(side_a.stream), _end(side_b.stream)
        with trio.fail_after(5):
            await app.send_all(b"ping")
            await app.send_eof()  # one way ends; the other never does
            counts = await pump.splice(a, b, idle_seconds=30, either_end=True)
            assert counts == (4, 0, False)
            assert await _read_all(far) == b"ping"  # its FIN passed on
        assert pump.active == 0


async def test_the_client_session_is_offered_after_the_first_bytes(
    contexts: Contexts, pump: NativePump
) -> None:
    offered: list[ssl.SSLSession] = []
    async with spliced(
        contexts, pump, tls_is_client=True, on_session=offered.append
    ) as (ln, _outcome, nursery):
        with trio.fail_after(5):
            await ln.agent.send_all(encode_data(b"first"))  # after the server's ticket
            assert await ln.app.receive_some(100) == b"first"
            while not offered:  # reported by the engine's thread, soon after
                await trio.sleep(0.01)
            assert len(offered) == 1 and offered[0].has_ticket
            # the connection was paused for that, and goes on
            await ln.agent.send_all(encode_data(b"second"))
            assert await ln.app.receive_some(100) == b"second"
            await ln.app.send_all(b"back")
            assert await ln.agent.receive_some(100) == encode_data(b"back")
            assert len(offered) == 1
            nursery.cancel_scope.cancel()


async def test_an_end_the_engine_cannot_use_is_refused_before_anything_moves(
    contexts: Contexts, pump: NativePump
) -> None:
    async with link(contexts) as ln:
        plain_end = ln.plain.native_end()
        assert plain_end is not None
        with pytest.raises(NativeRefused, match=r"expected an _ssl\._SSLSocket"):
            await pump.splice(plain_end, (ln.tls.fileno(), object(), 1), idle_seconds=1)
        other = ln.agent.ssl_object._sslobj  # type: ignore[attr-defined]
        with pytest.raises(NativeRefused, match="does not match its socket"):
            await pump.splice(plain_end, (ln.tls.fileno(), other, 1), idle_seconds=1)
        assert pump.active == 0
        # and the Python pumps serve it instead, through the same splice call
        outcome = Outcome()

        class Stubborn(FramedSide):
            def native_end(self) -> tuple[int, object | None, int]:
                return (ln.tls.fileno(), object(), 1)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_splice, outcome, ln.plain, Stubborn(ln.tls), pump)
            with trio.fail_after(5):
                await ln.app.send_all(b"still served")
                assert await ln.agent.receive_some(100) == encode_data(b"still served")
                nursery.cancel_scope.cancel()


def _end(stream: object) -> End:
    end = stream_end(stream)
    assert end is not None
    return end


async def _read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        data = await stream.receive_some(size - len(out))
        assert data, f"closed after {len(out)} of {size} bytes"
        out += data
    return bytes(out)


def _read_in_background(
    nursery: trio.Nursery, stream: trio.abc.ReceiveStream, size: int
) -> list[bytes]:
    """Start reading exactly ``size`` bytes from ``stream``; the list gets them then."""
    received: list[bytes] = []

    async def read() -> None:
        received.append(await _read_exactly(stream, size))

    nursery.start_soon(read)
    return received


async def test_a_copy_from_tls_moves_its_bytes_and_leaves_the_next_to_python(
    contexts: Contexts, pump: NativePump
) -> None:
    body = os.urandom(1024 * 1024 + 7)
    async with link(contexts) as ln, trio.open_nursery() as nursery:
        # The next message comes in the same burst: OpenSSL reads part of it ahead.
        nursery.start_soon(ln.agent.send_all, body + b"NEXT MESSAGE")
        received = _read_in_background(nursery, ln.app, len(body))
        with trio.fail_after(10):
            await pump.copy(_end(ln.tls), _end(ln.plain.stream), len(body), idle_seconds=5)
        with trio.fail_after(5):
            assert await _read_exactly(ln.tls, 12) == b"NEXT MESSAGE"
            await ln.tls.send_all(b"both ends are Python's again")
            assert await _read_exactly(ln.agent, 28) == b"both ends are Python's again"
        assert received == [body]
        with trio.move_on_after(0.2):  # no EOF was sent after the copy
            await ln.app.receive_some(10)
            pytest.fail("the copy sent an end of stream")
        assert pump.active == 0


async def test_a_copy_whose_sender_pauses_still_moves_what_came(
    contexts: Contexts, pump: NativePump
) -> None:
    # The engine asks the kernel to wake it only once most of a long rest has come
    # (SO_RCVLOWAT), for at most LOWAT_WAIT: a sender that sends a little at a time,
    # each time waiting until the app has it, is not left waiting for bytes that will
    # not come.
    body = os.urandom(2 << 20)
    piece = 100 << 10
    half = 5 * piece
    rest: list[bytes] = []
    async with link(contexts) as ln:
        async with trio.open_nursery() as nursery:

            async def sender() -> None:
                for at in range(0, half, piece):
                    await ln.agent.send_all(body[at : at + piece])
                    with trio.fail_after(5):
                        assert await _read_exactly(ln.app, piece) == body[at : at + piece]
                nursery.start_soon(ln.agent.send_all, body[half:])
                rest.append(await _read_exactly(ln.app, len(body) - half))

            nursery.start_soon(sender)
            with trio.fail_after(10):
                await pump.copy(_end(ln.tls), _end(ln.plain.stream), len(body), idle_seconds=5)
        assert rest == [body[half:]]
        assert pump.active == 0
        # the copy is done: the TLS side reads any byte again, as Python expects
        assert ln.tls.ssl_object.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


async def test_a_copy_from_plain_to_tls_reads_no_byte_past_its_size(
    contexts: Contexts, pump: NativePump
) -> None:
    body = os.urandom(300 * 1024)
    async with link(contexts) as ln, trio.open_nursery() as nursery:
        nursery.start_soon(ln.app.send_all, body + b"tail")
        received = _read_in_background(nursery, ln.agent, len(body))
        with trio.fail_after(10):
            await pump.copy(_end(ln.plain.stream), _end(ln.tls), len(body), idle_seconds=5)
            assert await ln.plain.stream.receive_some(100) == b"tail"
        assert received == [body]
        # its writes of several records were corked, and the socket is uncorked again
        tls_socket = socket.socket(fileno=os.dup(ln.tls.fileno()))
        try:
            assert tls_socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
        finally:
            tls_socket.close()


async def test_a_copy_whose_source_ends_early_fails_with_the_count(
    contexts: Contexts, pump: NativePump
) -> None:
    async with link(contexts) as ln:
        await ln.agent.send_all(b"x" * 1000)
        await ln.agent.aclose()  # close_notify after 1,000 bytes
        with trio.fail_after(5), pytest.raises(
            trio.BrokenResourceError, match="closed after 1000 of 5000 bytes"
        ):
            await pump.copy(_end(ln.tls), _end(ln.plain.stream), 5000, idle_seconds=5)
        assert await _read_exactly(ln.app, 1000) == b"x" * 1000


async def test_a_copy_fails_when_idle_and_is_taken_back_when_cancelled(
    contexts: Contexts, pump: NativePump
) -> None:
    async with link(contexts) as ln:
        await ln.agent.send_all(b"12345")
        with trio.fail_after(5), pytest.raises(
            trio.BrokenResourceError, match=r"no byte moved for 0.3s \(5 of 10 bytes copied\)"
        ):
            await pump.copy(_end(ln.tls), _end(ln.plain.stream), 10, idle_seconds=0.3)
        assert pump.active == 0
    async with link(contexts) as ln:
        with trio.move_on_after(0.2) as waited:
            await pump.copy(_end(ln.tls), _end(ln.plain.stream), 10, idle_seconds=30)
        assert waited.cancelled_caught and pump.active == 0


async def test_a_copy_until_reply_stops_when_the_destination_speaks(
    contexts: Contexts, pump: NativePump
) -> None:
    size = 1024 * 1024
    async with link(contexts) as ln:
        # The destination spoke before the copy began: nothing moves.
        await ln.agent.send_all(b"early")
        with trio.fail_after(5):
            moved = await pump.copy(
                _end(ln.plain.stream), _end(ln.tls), size, idle_seconds=5, until_reply=True
            )
            assert moved == 0
            assert await ln.tls.receive_some(100) == b"early"
    async with link(contexts) as ln, trio.open_nursery() as nursery:
        # It speaks part way: the copy stops with whole writes only, the rest is
        # still to read from the source.
        first, rest = b"a" * (200 * 1024), b"b" * (size - 200 * 1024)
        moved_box: list[int] = []

        async def copy() -> None:
            moved_box.append(await pump.copy(
                _end(ln.plain.stream), _end(ln.tls), size, idle_seconds=5, until_reply=True
            ))

        nursery.start_soon(copy)
        with trio.fail_after(10):
            await ln.app.send_all(first)
            got = await _read_exactly(ln.agent, len(first))
            await ln.agent.send_all(b"413 too big")
            while not moved_box:
                await trio.sleep(0.01)
            nursery.start_soon(ln.app.send_all, rest)
            moved = moved_box[0]
            assert moved == len(first) and got == first
            assert await _read_exactly(ln.tls, 11) == b"413 too big"
            assert await _read_exactly(ln.plain.stream, len(rest)) == rest
        assert pump.active == 0


async def test_a_copy_takes_no_framed_end(contexts: Contexts, pump: NativePump) -> None:
    async with link(contexts) as ln:
        framed = stream_end(ln.tls, framed=True)
        assert framed is not None
        with pytest.raises(NativeRefused, match="a copy with a limit takes plain or raw TLS"):
            await pump.copy(framed, _end(ln.plain.stream), 10, idle_seconds=1)
        with pytest.raises(ValueError, match="at least one byte"):
            await pump.copy(_end(ln.tls), _end(ln.plain.stream), 0, idle_seconds=1)
        assert pump.active == 0


async def test_many_connections_on_one_engine(contexts: Contexts, pump: NativePump) -> None:
    # More connections than the engine's first slot table (64), each its own bytes.
    count = 150
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        a, proxy_a = await tcp_pair()
        proxy_b, b = await tcp_pair()
        async with a, b, trio.open_nursery() as n:
            outcome = Outcome()
            n.start_soon(_splice, outcome, PlainSide(plain_stream(proxy_a)),
                         PlainSide(plain_stream(proxy_b)), pump)
            payload = f"connection {i} ".encode() * (i + 1)
            await a.send_all(payload)
            await a.send_eof()
            results[i] = await _read_all(b)
            await b.send_eof()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
    assert all(results[i] == f"connection {i} ".encode() * (i + 1) for i in range(count))
    assert pump.active == 0
