"""Round-robin with passive ejection: a table of cases, time passed in."""

from __future__ import annotations

from meshagent.routing.balance import EndpointBalancer
from meshagent.snapshot.model import Endpoint

A, B, C = (Endpoint(host="10.0.0.1", port=p, service="orders") for p in (1, 2, 3))


def picks(balancer: EndpointBalancer, endpoints: list[Endpoint], n: int, now: float = 0) -> list[int]:
    out = []
    for _ in range(n):
        chosen = balancer.pick(endpoints, now)
        assert chosen is not None
        out.append(chosen.port)
    return out


def test_round_robin_visits_every_endpoint_in_turn() -> None:
    assert picks(EndpointBalancer(), [A, B, C], 7) == [1, 2, 3, 1, 2, 3, 1]


def test_empty_list_gives_none() -> None:
    assert EndpointBalancer().pick([], 0) is None


def test_excluded_endpoints_are_never_picked() -> None:
    balancer = EndpointBalancer()
    for _ in range(6):
        assert balancer.pick([A, B, C], 0, exclude=[A, C]) == B
    assert balancer.pick([A, B], 0, exclude=[A, B]) is None


def test_failed_endpoint_is_skipped_until_its_ejection_ends() -> None:
    balancer = EndpointBalancer(base_ejection_seconds=1, max_ejection_seconds=30)
    assert balancer.report_failure(B, now=10) == 11
    assert balancer.is_ejected(B, 10.5)
    assert 2 not in picks(balancer, [A, B, C], 6, now=10.5)
    assert not balancer.is_ejected(B, 11)
    assert 2 in picks(balancer, [A, B, C], 3, now=11)


def test_ejection_doubles_per_consecutive_failure_up_to_the_cap() -> None:
    balancer = EndpointBalancer(base_ejection_seconds=1, max_ejection_seconds=5)
    durations = [balancer.report_failure(A, now=0) for _ in range(5)]
    assert durations == [1, 2, 4, 5, 5]
    balancer.report_success(A)
    assert balancer.report_failure(A, now=0) == 1


def test_when_all_are_ejected_the_one_back_soonest_is_tried() -> None:
    balancer = EndpointBalancer(base_ejection_seconds=1)
    balancer.report_failure(A, now=0)
    balancer.report_failure(A, now=0)  # A: until 2
    balancer.report_failure(B, now=0)  # B: until 1
    assert balancer.pick([A, B], now=0.5) == B
    assert balancer.pick([A, B], now=0.5, exclude=[B]) == A


def test_forget_drops_endpoints_the_catalog_no_longer_lists() -> None:
    balancer = EndpointBalancer()
    balancer.report_failure(A, now=0)
    balancer.report_failure(B, now=0)
    balancer.forget([B])
    assert not balancer.is_ejected(A, 0)
    assert balancer.is_ejected(B, 0)


def test_round_robin_survives_a_shrinking_list() -> None:
    balancer = EndpointBalancer()
    picks(balancer, [A, B, C], 2)
    assert picks(balancer, [A], 3) == [1, 1, 1]


def test_thousands_of_failures_stay_at_the_cap() -> None:
    # A burst of handshake timeouts failed one endpoint 1,024 times in the benchmark:
    # the next doubling was 2.0 ** 1024, an OverflowError for every later connection.
    b = EndpointBalancer(base_ejection_seconds=1.0, max_ejection_seconds=30.0)
    ejected_for = [b.report_failure(A, now=float(n)) - n for n in range(5000)]
    assert ejected_for[:6] == [1, 2, 4, 8, 16, 30]
    assert set(ejected_for[5:]) == {30.0}
    assert b.is_ejected(A, now=5000.0)
    b.report_success(A)
    assert b.report_failure(A, now=0.0) == 1.0  # a success starts the doubling again
