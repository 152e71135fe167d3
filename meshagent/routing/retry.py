"""Retry decisions: which failures may be retried, with what backoff, within a budget.
Pure: ``now`` and ``rng`` are parameters.

A retry budget keeps retries from amplifying an outage: over the last ``window_seconds``
retries may add at most ``budget_percent`` of the requests, plus a floor of
``min_retries_per_second`` so that a quiet service can still retry at all. When the
upstream is down, every request fails, the budget is soon spent, and the extra load
stays bounded at ``budget_percent`` instead of multiplying by the attempt count.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


@dataclass(frozen=True, slots=True)
class RetryRule:
    attempts: int = 1  # tries in all, the first included
    on_connect_failure: bool = True
    on_reset: bool = False
    on_timeout: bool = False
    statuses: frozenset[int] = frozenset()
    idempotent_only: bool = True
    backoff_base_seconds: float = 0.025
    backoff_max_seconds: float = 0.25
    budget_percent: float = 20.0
    min_retries_per_second: float = 10.0

    def may_retry_method(self, method: bytes) -> bool:
        return not self.idempotent_only or method in IDEMPOTENT


# More doublings than any cap needs (2**64 times the base); past it the cap holds anyway.
_MAX_DOUBLINGS = 64


def doubling(base: float, step: int, cap: float) -> float:
    """``base * 2**(step-1)``, at most ``cap``: the n-th wait of an exponential backoff.
    The exponent stops too (2.0 ** 1024 overflows a float, and an endpoint can fail a
    thousand times in a burst of handshakes)."""
    return min(cap, base * 2.0 ** min(step - 1, _MAX_DOUBLINGS))


def backoff_seconds(rule: RetryRule, retry: int, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**(retry-1))] for the n-th retry."""
    return rng.uniform(
        0, doubling(rule.backoff_base_seconds, retry, rule.backoff_max_seconds)
    )


class RetryBudget:
    """Requests and retries seen in a sliding window; at most ``budget_percent`` extra."""

    __slots__ = ("_requests", "_retries", "window_seconds")

    def __init__(self, window_seconds: float = 10.0) -> None:
        self.window_seconds = window_seconds
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.window_seconds
        for times in (self._requests, self._retries):
            while times and times[0] <= edge:
                times.popleft()

    def record_request(self, now: float, count: int = 1) -> None:
        """``count`` requests (first tries) at ``now``."""
        self._trim(now)
        if count == 1:
            self._requests.append(now)
        else:
            self._requests.extend(itertools.repeat(now, count))

    def try_spend(self, rule: RetryRule, now: float) -> bool:
        """Take one retry from the budget if there is one left."""
        self._trim(now)
        allowed = max(
            rule.min_retries_per_second * self.window_seconds,
            len(self._requests) * rule.budget_percent / 100.0,
        )
        if len(self._retries) + 1 > allowed:
            return False
        self._retries.append(now)
        return True
