"""The idle-connection pool (dataplane/pool.py) on real loopback sockets: reuse order,
expiry, stale connections, bounds, and the sweep that closes what nobody takes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Hashable

import pytest
import trio

from meshagent.dataplane.errors import DataplaneError, UpstreamConnectError, UpstreamTimeout
from meshagent.dataplane.plainsocket import PlainSocketStream
from meshagent.dataplane.pool import ConnectionPool, PoolTimeout, Upstream, sweep_forever
from tests.support.net import plain_stream
from tests.support.tls import tcp_pair


class Peers:
    """Upstream connections for the pool, and their far ends (the 'servers')."""

    def __init__(self) -> None:
        self.far: list[trio.SocketStream] = []
        self.near: list[PlainSocketStream] = []

    async def new(self) -> PlainSocketStream:
        near, far = await tcp_pair()
        self.far.append(far)
        self.near.append(plain_stream(near))
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
    pool.release("a", first)
    pool.release("a", second)
    assert pool.take("b") is None
    assert pool.take("a") is second
    await trio.aclose_forcefully(peers.far[0])  # the server closed the older one
    assert pool.take("a") is None
    assert closed(first) and pool.idle_count() == 0


async def test_sweep_closes_expired_and_stale_connections_under_every_key(
    peers: Peers,
) -> None:
    pool = ConnectionPool(None, idle_seconds=0.2)
    old = [await peers.new() for _ in range(3)]
    for n, stream in enumerate(old):
        pool.release(("old-context", n % 2), stream)  # keys nobody asks for again
    await trio.sleep(0.3)
    fresh, stale = await peers.new(), await peers.new()
    pool.release("live", fresh)
    pool.release("live", stale)
    await trio.aclose_forcefully(peers.far[-1])
    assert pool.idle_count() == 5
    assert pool.sweep() == 4
    assert all(closed(stream) for stream in (*old, stale))
    assert not closed(fresh) and pool.idle_count() == 1
    assert pool.take("live") is fresh
    assert pool.sweep() == 0 and pool.idle_count() == 0


async def test_bounds_per_key_and_in_all_close_the_surplus(peers: Peers) -> None:
    pool = ConnectionPool(None, max_idle_per_key=2, max_idle=3)
    streams = [await peers.new() for _ in range(5)]
    for stream in streams[:3]:
        pool.release("a", stream)
    assert closed(streams[2]) and pool.idle_count() == 2  # over the key's bound
    pool.release("b", streams[3])
    pool.release("b", streams[4])  # over the total: the oldest key's oldest goes
    assert closed(streams[0]) and pool.idle_count() == 3


async def test_the_sweeper_runs_until_cancelled(peers: Peers) -> None:
    pool = ConnectionPool(None, idle_seconds=0.05)
    stream = await peers.new()
    pool.release("gone", stream)
    with trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep_forever, [pool], 0.05)
            while not closed(stream):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert closed(stream) and pool.idle_count() == 0



class Gate:
    """A connect that waits until the test lets it finish or fail (``finish``), so that
    the test sees connects in progress."""

    def __init__(self, peers: Peers) -> None:
        self.peers = peers
        self.go: list[trio.Event] = []
        self.failing: set[int] = set()

    async def connect(self, key: Hashable) -> Upstream:
        n = len(self.go)
        self.go.append(trio.Event())
        await self.go[n].wait()
        if n in self.failing:
            raise UpstreamConnectError(f"connect {key}: refused")
        return await self.peers.new()

    def finish(self, n: int, *, fail: bool = False) -> None:
        if fail:
            self.failing.add(n)
        self.go[n].set()


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.lowlevel.checkpoint()


class Requests:
    """Requests for a connection to key "a", each in its own task: what each got."""

    def __init__(self, pool: ConnectionPool, nursery: trio.Nursery) -> None:
        self.pool = pool
        self.nursery = nursery
        self.got: dict[int, tuple[Upstream, bool] | DataplaneError] = {}

    async def start(self, n: int, wait_seconds: float = 10) -> None:
        """Request ``n``; returns once it is connecting or waiting in line."""
        before = self.pool.connecting("a") + self.pool.waiting("a")
        self.nursery.start_soon(self._request, n, wait_seconds)
        await until(lambda: self.pool.connecting("a") + self.pool.waiting("a") > before)

    async def _request(self, n: int, wait_seconds: float) -> None:
        try:
            self.got[n] = await self.pool.acquire("a", wait_seconds=wait_seconds)
        except DataplaneError as exc:
            self.got[n] = exc

    def stream(self, n: int) -> Upstream:
        got = self.got[n]
        assert isinstance(got, tuple)
        return got[0]


async def test_connects_past_the_bound_wait_in_line_for_a_connection_or_a_slot(
    peers: Peers,
) -> None:
    gate = Gate(peers)
    pool = ConnectionPool(gate.connect, max_connecting_per_key=2)
    async with trio.open_nursery() as nursery:
        requests = Requests(pool, nursery)
        for n in range(5):
            await requests.start(n)
        assert pool.connecting("a") == 2 and pool.waiting("a") == 3
        assert len(gate.go) == 2  # requests 2, 3 and 4 started no connect
        gate.finish(0)
        await until(lambda: 0 in requests.got and len(gate.go) == 3)
        assert requests.got[0] == (requests.stream(0), False)
        # request 0's slot went to request 2, the first in line
        assert pool.connecting("a") == 2 and pool.waiting("a") == 2
        pool.release("a", requests.stream(0))  # handed to request 3, never idle
        await until(lambda: 3 in requests.got)
        assert requests.got[3] == (requests.stream(0), True) and pool.idle_count() == 0
        gate.finish(1, fail=True)  # a failed connect frees its slot too: for request 4
        await until(lambda: len(gate.go) == 4)
        gate.finish(2)
        gate.finish(3)
    assert isinstance(requests.got[1], UpstreamConnectError)
    assert requests.got[2] == (requests.stream(2), False)
    assert requests.got[4] == (requests.stream(4), False)
    assert pool.connecting("a") == 0 and pool.waiting("a") == 0
    assert pool.opened == 3 and pool.reused == 1


async def test_the_gauges_sum_idle_connecting_and_waiting_over_every_key(
    peers: Peers,
) -> None:
    gate = Gate(peers)
    pool = ConnectionPool(gate.connect, max_connecting_per_key=1)
    assert pool.gauges() == (0, 0, 0)
    pool.release("b", await peers.new())
    pool.release("c", await peers.new())
    async with trio.open_nursery() as nursery:
        requests = Requests(pool, nursery)
        for n in range(3):  # key "a": one connecting, two in line
            await requests.start(n)
        assert pool.gauges() == (2, 1, 2)
        for n in range(3):  # each connect starts once the one before ended
            await until(lambda: len(gate.go) > n)  # noqa: B023 - awaited at once
            gate.finish(n)
    assert pool.gauges() == (2, 0, 0)
    for n in range(3):
        pool.release("a", requests.stream(n))
    assert pool.gauges() == (5, 0, 0)


async def test_a_request_waits_its_deadline_then_leaves_the_line(peers: Peers) -> None:
    gate = Gate(peers)
    pool = ConnectionPool(gate.connect, max_connecting_per_key=1)
    async with trio.open_nursery() as nursery:
        requests = Requests(pool, nursery)
        await requests.start(0)
        await requests.start(1, wait_seconds=0.05)
        await requests.start(2)
        await until(lambda: 1 in requests.got)
        got = requests.got[1]
        assert isinstance(got, PoolTimeout) and isinstance(got, UpstreamTimeout)
        assert str(got) == "no connection within 0.05s: 1 connects already in progress"
        assert pool.connecting("a") == 1 and pool.waiting("a") == 1  # request 2 waits on
        gate.finish(0)
        await until(lambda: len(gate.go) == 2)
        gate.finish(1)
    assert len(requests.got) == 3 and pool.waiting("a") == 0 and pool.connecting("a") == 0


async def test_a_request_that_will_not_wait_takes_no_place_in_line(peers: Peers) -> None:
    gate = Gate(peers)
    pool = ConnectionPool(gate.connect, max_connecting_per_key=1)
    async with trio.open_nursery() as nursery:
        requests = Requests(pool, nursery)
        await requests.start(0)
        with pytest.raises(PoolTimeout, match=r"^1 connects already in progress$"):
            await pool.acquire("a", wait_seconds=0)
        assert pool.connecting("a") == 1 and pool.waiting("a") == 0
        gate.finish(0)
        await until(lambda: 0 in requests.got)
        pool.release("a", requests.stream(0))
        # a free slot or an idle connection: no wait needed, none taken
        assert await pool.acquire("a", wait_seconds=0) == (requests.stream(0), True)
    assert len(gate.go) == 1


async def test_a_cancelled_request_passes_on_what_it_was_handed(peers: Peers) -> None:
    gate = Gate(peers)
    pool = ConnectionPool(gate.connect, max_connecting_per_key=1)
    spare = await peers.new()
    async with trio.open_nursery() as nursery:
        requests = Requests(pool, nursery)
        await requests.start(0)
        doomed = trio.CancelScope()

        async def cancelled_in_line() -> None:
            with doomed:
                await pool.acquire("a", wait_seconds=10)
                raise AssertionError("cancelled before it resumed")

        nursery.start_soon(cancelled_in_line)
        await until(lambda: pool.waiting("a") == 1)
        await requests.start(1)
        # Cancelled, then handed a connection before it runs again (release hands over
        # without a checkpoint): the connection goes on to the next in line.
        doomed.cancel()
        pool.release("a", spare)
        await until(lambda: 1 in requests.got)
        assert requests.got[1] == (spare, True) and pool.idle_count() == 0
        # The same with a slot: whichever runs first, the slot is not lost.
        doomed = trio.CancelScope()
        nursery.start_soon(cancelled_in_line)
        await until(lambda: pool.waiting("a") == 1)
        await requests.start(2)
        assert pool.waiting("a") == 2
        doomed.cancel()
        gate.finish(0)
        await until(lambda: len(gate.go) == 2)
        gate.finish(1)
        await until(lambda: 2 in requests.got)
    assert requests.got[2] == (requests.stream(2), False)
    assert len(gate.go) == 2 and pool.connecting("a") == 0 and pool.waiting("a") == 0


async def test_a_draining_pool_still_hands_a_connection_to_a_waiting_request(
    peers: Peers,
) -> None:
    gate = Gate(peers)
    pool = ConnectionPool(gate.connect, max_connecting_per_key=1)
    first, second = await peers.new(), await peers.new()
    async with trio.open_nursery() as nursery:
        requests = Requests(pool, nursery)
        await requests.start(0)
        await requests.start(1)
        pool.close_idle()  # the agent drains; request 1 is still in line
        pool.release("a", first)
        await until(lambda: 1 in requests.got)
        assert requests.got[1] == (first, True)
        pool.release("a", second)  # nobody waits: closed, not kept
        assert closed(second) and pool.idle_count() == 0
        gate.finish(0)
