"""The idle-connection pool (dataplane/pool.py) on real loopback sockets: reuse order,
expiry, stale connections, bounds, and the sweep that closes what nobody takes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.pool import ConnectionPool, sweep_forever
from tests.support.tls import tcp_pair


class Peers:
    """Upstream connections for the pool, and their far ends (the 'servers')."""

    def __init__(self) -> None:
        self.far: list[trio.SocketStream] = []
        self.near: list[PlainSocketStream] = []

    async def new(self) -> PlainSocketStream:
        near, far = await tcp_pair()
        self.far.append(far)
        self.near.append(PlainSocketStream.wrap(near))
        return self.near[-1]


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    made = Peers()
    yield made
    for stream in (*made.far, *made.near):
        await trio.aclose_forcefully(stream)


def closed(stream: PlainSocketStream) -> bool:
    return stream.fileno() < 0


async def test_take_gives_the_most_recent_usable_connection(peers: Peers) -> None:
    pool = ConnectionPool(None)
    first, second = await peers.new(), await peers.new()
    await pool.release("a", first)
    await pool.release("a", second)
    assert await pool.take("b") is None
    assert await pool.take("a") is second
    await trio.aclose_forcefully(peers.far[0])  # the server closed the older one
    assert await pool.take("a") is None
    assert closed(first) and pool.idle_count() == 0


async def test_sweep_closes_expired_and_stale_connections_under_every_key(
    peers: Peers,
) -> None:
    pool = ConnectionPool(None, idle_seconds=0.2)
    old = [await peers.new() for _ in range(3)]
    for n, stream in enumerate(old):
        await pool.release(("old-context", n % 2), stream)  # keys nobody asks for again
    await trio.sleep(0.3)
    fresh, stale = await peers.new(), await peers.new()
    await pool.release("live", fresh)
    await pool.release("live", stale)
    await trio.aclose_forcefully(peers.far[-1])
    assert pool.idle_count() == 5
    assert await pool.sweep() == 4
    assert all(closed(stream) for stream in (*old, stale))
    assert not closed(fresh) and pool.idle_count() == 1
    assert await pool.take("live") is fresh
    assert await pool.sweep() == 0 and pool.idle_count() == 0


async def test_bounds_per_key_and_in_all_close_the_surplus(peers: Peers) -> None:
    pool = ConnectionPool(None, max_idle_per_key=2, max_idle=3)
    streams = [await peers.new() for _ in range(5)]
    for stream in streams[:3]:
        await pool.release("a", stream)
    assert closed(streams[2]) and pool.idle_count() == 2  # over the key's bound
    await pool.release("b", streams[3])
    await pool.release("b", streams[4])  # over the total: the oldest key's oldest goes
    assert closed(streams[0]) and pool.idle_count() == 3


async def test_the_sweeper_runs_until_cancelled(peers: Peers) -> None:
    pool = ConnectionPool(None, idle_seconds=0.05)
    stream = await peers.new()
    await pool.release("gone", stream)
    with trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep_forever, [pool], 0.05)
            while not closed(stream):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert closed(stream) and pool.idle_count() == 0
