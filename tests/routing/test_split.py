"""Weighted and sticky splits: shares, stability, minimal movement."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshagent.routing.split import choose_backend, choose_sticky, subset
from meshagent.snapshot.model import Backend, Endpoint

V1 = Backend(service="orders", tags=(("version", "v1"),), weight=95)
V2 = Backend(service="orders", tags=(("version", "v2"),), weight=5)


def test_weighted_split_lands_within_tolerance_over_20000_requests() -> None:
    rng = random.Random(7)
    counts = Counter(choose_backend([V1, V2], rng).label() for _ in range(20_000))
    share = counts[V2.label()] / 20_000
    assert abs(share - 0.05) <= 0.006


@pytest.mark.parametrize("seed", range(5))
def test_fine_weights_of_one_in_ten_thousand_are_honoured(seed: int) -> None:
    rare = Backend(service="orders", tags=(("version", "v3"),), weight=0.01)
    common = Backend(service="orders", weight=99.99)
    rng = random.Random(seed)
    hits = sum(choose_backend([common, rare], rng) is rare for _ in range(200_000))
    assert 2 <= hits <= 50  # expected 20


def test_zero_weights_are_never_chosen_and_all_zero_is_an_error() -> None:
    zero = Backend(service="orders", weight=0)
    rng = random.Random(1)
    assert {choose_backend([zero, V1], rng) for _ in range(100)} == {V1}
    assert {choose_sticky([zero, V1], str(k).encode()) for k in range(100)} == {V1}
    with pytest.raises(ValueError):
        choose_backend([zero], rng)
    with pytest.raises(ValueError):
        choose_sticky([zero], b"k")


def test_sticky_is_stable_and_shares_follow_weights() -> None:
    keys = [f"user-{n}".encode() for n in range(20_000)]
    first = [choose_sticky([V1, V2], k) for k in keys]
    assert first == [choose_sticky([V1, V2], k) for k in keys]  # same key, same backend
    assert first == [choose_sticky([V2, V1], k) for k in keys]  # order does not matter
    share = sum(b is V2 for b in first) / len(keys)
    assert abs(share - 0.05) <= 0.006


def test_raising_the_canary_moves_the_fewest_users_and_only_towards_it() -> None:
    keys = [f"user-{n}".encode() for n in range(20_000)]
    v2_10 = Backend(service="orders", tags=V2.tags, weight=10)
    v1_90 = Backend(service="orders", tags=V1.tags, weight=90)
    before = [choose_sticky([V1, V2], k).tags for k in keys]
    after = [choose_sticky([v1_90, v2_10], k).tags for k in keys]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(b == V1.tags and a == V2.tags for b, a in moved)  # nobody leaves v2
    assert abs(len(moved) / len(keys) - 0.05) <= 0.006


def test_adding_a_third_subset_only_takes_users_for_itself() -> None:
    keys = [f"user-{n}".encode() for n in range(10_000)]
    v3 = Backend(service="orders", tags=(("version", "v3"),), weight=10)
    before = [choose_sticky([V1, V2], k) for k in keys]
    after = [choose_sticky([V1, V2, v3], k) for k in keys]
    assert all(a is v3 for b, a in zip(before, after, strict=True) if a is not b)


def test_subset_filters_by_service_and_tags() -> None:
    endpoints = (
        Endpoint(host="10.0.0.1", port=1, service="orders", tags=(("version", "v1"), ("zone", "a"))),
        Endpoint(host="10.0.0.2", port=1, service="orders", tags=(("version", "v2"),)),
        Endpoint(host="10.0.0.3", port=1, service="payments", tags=(("version", "v1"),)),
    )
    assert [e.host for e in subset(endpoints, V1)] == ["10.0.0.1"]
    assert [e.host for e in subset(endpoints, Backend(service="orders"))] == ["10.0.0.1", "10.0.0.2"]
    assert subset(endpoints, Backend(service="orders", tags=(("version", "v9"),))) == ()
