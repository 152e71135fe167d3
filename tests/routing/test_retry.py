"""Retry budget and backoff: tables, explicit time."""

from __future__ import annotations

import random

from meshagent.routing.retry import RetryBudget, RetryRule, backoff_seconds


def test_budget_caps_retries_at_a_share_of_requests() -> None:
    rule = RetryRule(attempts=3, budget_percent=20, min_retries_per_second=0)
    budget = RetryBudget(window_seconds=10)
    granted = 0
    for n in range(1000):  # an outage: every request fails and wants retries
        now = n * 0.001
        budget.record_request(now)
        granted += sum(budget.try_spend(rule, now) for _ in range(2))
    assert 195 <= granted <= 200  # 20 % of 1000, never 2000


def test_budget_floor_lets_a_quiet_service_retry() -> None:
    rule = RetryRule(budget_percent=20, min_retries_per_second=1)
    budget = RetryBudget(window_seconds=10)
    budget.record_request(0)
    assert sum(budget.try_spend(rule, 0) for _ in range(20)) == 10  # 1/s over 10 s


def test_budget_window_slides() -> None:
    rule = RetryRule(budget_percent=100, min_retries_per_second=0)
    budget = RetryBudget(window_seconds=10)
    budget.record_request(0)
    assert budget.try_spend(rule, 0) and not budget.try_spend(rule, 1)
    budget.record_request(11)  # the first request and retry left the window
    assert budget.try_spend(rule, 11)


def test_backoff_is_jittered_and_capped() -> None:
    rule = RetryRule(backoff_base_seconds=0.1, backoff_max_seconds=0.3)
    rng = random.Random(1)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.3), (6, 0.3), (5000, 0.3)):  # no overflow
        samples = [backoff_seconds(rule, retry, rng) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # really spread over the range


def test_idempotent_methods() -> None:
    rule = RetryRule()
    assert rule.may_retry_method(b"GET") and not rule.may_retry_method(b"POST")
    assert RetryRule(idempotent_only=False).may_retry_method(b"POST")


def test_budget_counts_a_batch_of_requests_as_many() -> None:
    rule = RetryRule(budget_percent=10, min_retries_per_second=0)
    budget = RetryBudget(window_seconds=10)
    budget.record_request(0, count=50)  # the C relay's requests arrive in batches
    assert sum(budget.try_spend(rule, 0) for _ in range(10)) == 5
