"""The parts of the worker supervisor that need no process: the socketpair framing and
summing counters over processes."""

from __future__ import annotations

import pickle
import socket

import pytest
import trio

from meshagent.agent.workers import (
    MAX_FRAME_BYTES,
    Channel,
    ChannelError,
    Drain,
    StatsRequest,
    add_counters,
    add_http,
    copy_stats,
)
from meshagent.dataplane.connection import (
    LATENCY_BUCKETS_SECONDS,
    ConnectionCounters,
    DataplaneContext,
    HttpStats,
)


def channel_pair() -> tuple[Channel, socket.socket]:
    ours, theirs = socket.socketpair()
    return Channel(trio.SocketStream(trio.socket.from_stdlib_socket(ours))), theirs


async def test_messages_cross_in_order_whatever_the_chunking() -> None:
    a, b = socket.socketpair()
    left = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(a)))
    right = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(b)))
    async with left, right:
        big = Drain(seconds=1.5), StatsRequest(seq=7), "x" * 300_000  # over a socket buffer

        async def send_all() -> None:
            for message in big:
                await left.send(message)
            await left.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            assert [await right.receive() for _ in big] == list(big)
            assert await right.receive() is None


async def test_a_frame_split_byte_by_byte_still_decodes() -> None:
    channel, raw = channel_pair()
    data = pickle.dumps(StatsRequest(seq=3))
    frame = len(data).to_bytes(4, "big") + data
    async with channel:

        async def dribble() -> None:
            for n in range(len(frame)):
                raw.send(frame[n : n + 1])
                await trio.lowlevel.checkpoint()
            raw.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            assert await channel.receive() == StatsRequest(seq=3)
            assert await channel.receive() is None


async def test_oversized_and_garbage_frames_are_errors_not_crashes() -> None:
    channel, raw = channel_pair()
    async with channel:
        raw.send((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
        with pytest.raises(ChannelError, match="at most"):
            await channel.receive()
        raw.close()
    channel, raw = channel_pair()
    async with channel:
        raw.send((5).to_bytes(4, "big") + b"\x00junk")
        with pytest.raises(ChannelError, match="undecodable frame"):
            await channel.receive()
        raw.close()


async def test_a_truncated_frame_is_the_end_of_the_stream() -> None:
    channel, raw = channel_pair()
    async with channel:
        raw.send((100).to_bytes(4, "big") + b"abc")
        raw.close()
        assert await channel.receive() is None


def test_counters_sum_over_processes_field_by_field() -> None:
    total: dict[str, ConnectionCounters] = {}
    one = ConnectionCounters(accepted=3, active=1, failed=1, bytes_in=10, bytes_out=20,
                             plaintext=2, failures={"handshake": 1},
                             tls_failures={"expired": 1})
    two = ConnectionCounters(accepted=4, active=2, failed=2, bytes_in=1, bytes_out=2,
                             plaintext=0, failures={"handshake": 1, "unauthorized": 1},
                             tls_failures={"expired": 1})
    add_counters(total, {"inbound:orders": one})
    add_counters(total, {"inbound:orders": two, "outbound:web": one})
    assert total["inbound:orders"] == ConnectionCounters(
        accepted=7, active=3, failed=3, bytes_in=11, bytes_out=22, plaintext=2,
        failures={"handshake": 2, "unauthorized": 1}, tls_failures={"expired": 2},
    )
    assert total["outbound:web"] == one and total["outbound:web"] is not one
    assert one.failures == {"handshake": 1}  # the inputs are left alone


def test_http_stats_sum_requests_and_every_latency_bucket() -> None:
    one, two = HttpStats(), HttpStats()
    labels = {"destination": "orders", "route": "r", "subset": "v1", "source": "web"}
    one.record(labels, 200, 0.002)
    two.record(labels, 200, 0.2)
    two.record(labels, 503, 0.02)
    total = HttpStats()
    add_http(total, one)
    add_http(total, two)
    assert total.requests == {("orders", "r", "v1", "web", "2xx"): 2,
                              ("orders", "r", "v1", "web", "5xx"): 1}
    slot = total.latency[("orders", "r")]
    assert len(slot) == len(LATENCY_BUCKETS_SECONDS) + 2
    assert slot[-2] == 3 and slot[-1] == pytest.approx(0.222)
    assert slot[LATENCY_BUCKETS_SECONDS.index(0.0025)] == 1
    assert slot[LATENCY_BUCKETS_SECONDS.index(0.25)] == 3
    assert one.latency[("orders", "r")][-2] == 1  # unchanged


def test_copy_stats_is_a_snapshot_later_traffic_does_not_touch() -> None:
    ctx = DataplaneContext(source=None, tls=None)  # type: ignore[arg-type]
    ctx.listener_counters("inbound:orders").accepted = 5
    by_listener, http = copy_stats(ctx)
    ctx.listener_counters("inbound:orders").accepted = 6
    assert by_listener["inbound:orders"].accepted == 5
    assert http.requests == {}


def test_http_stats_count_a_batch_as_its_requests_one_by_one() -> None:
    labels = {"destination": "orders", "route": "r", "subset": "v1", "source": "web"}
    answers = [(200, 0.0005), (200, 0.001), (404, 0.0011), (503, 3.0), (200, 99.0), (101, 0.1)]
    batch, single = HttpStats(), HttpStats()
    batch.record_many(labels, answers)
    for status, seconds in answers:  # the reference: every bucket whose bound holds it
        key = ("orders", "r", "v1", "web", f"{status // 100}xx")
        single.requests[key] = single.requests.get(key, 0) + 1
        slot = single.latency.setdefault(("orders", "r"), [0.0] * (len(LATENCY_BUCKETS_SECONDS) + 2))
        for n, bound in enumerate(LATENCY_BUCKETS_SECONDS):
            slot[n] += seconds <= bound
        slot[-2] += 1
        slot[-1] += seconds
    assert batch.requests == single.requests
    assert batch.latency == single.latency


def test_http_stats_take_a_summary_only_with_a_count_per_bucket() -> None:
    with pytest.raises(ValueError, match="a count per latency bucket"):
        HttpStats().record_summary({}, [0, 0, 1, 0, 0, 0], [1], 0.1)
