"""Round-robin over healthy endpoints, with passive ejection of ones that failed.

Theory of operation. Consul tells us which endpoints pass their health checks, but only
at the speed of its checks; between two checks an endpoint can refuse connections. Each
failed connect (refused, timed out, wrong identity) ejects that endpoint for a while,
doubling per consecutive failure (``base`` .. ``cap`` seconds); a success clears it.

Invariants:
* ``pick`` never returns an endpoint in ``exclude`` (the ones this request already tried).
* It prefers endpoints that are not ejected, in round-robin order.
* If every remaining endpoint is ejected it still returns one (the one whose ejection
  ends first): trying beats failing the caller outright ("panic mode").
* The state is bounded by the number of distinct endpoints reported, and ``forget``
  drops what the catalog no longer lists.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from meshagent.routing.retry import doubling
from meshagent.snapshot.model import Endpoint


@dataclass(slots=True)
class _Ejection:
    failures: int
    until: float


class EndpointBalancer:
    """Per-listener balancing state. Not thread-safe; one trio task at a time."""

    __slots__ = ("_base", "_cap", "_ejections", "_next")

    def __init__(self, *, base_ejection_seconds: float = 1.0, max_ejection_seconds: float = 30.0):
        self._base = base_ejection_seconds
        self._cap = max_ejection_seconds
        self._ejections: dict[tuple[str, int], _Ejection] = {}
        self._next = 0

    def pick(
        self, endpoints: Sequence[Endpoint], now: float, exclude: Collection[Endpoint] = ()
    ) -> Endpoint | None:
        """The next endpoint to try, or None if every endpoint is excluded. Pure."""
        count = len(endpoints)
        start = self._next
        fallback: Endpoint | None = None
        fallback_until = 0.0
        for step in range(count):
            endpoint = endpoints[(start + step) % count]
            if endpoint in exclude:
                continue
            ejection = self._ejections.get((endpoint.host, endpoint.port))
            if ejection is None or ejection.until <= now:
                self._next = (start + step + 1) % count
                return endpoint
            if fallback is None or ejection.until < fallback_until:
                fallback, fallback_until = endpoint, ejection.until
        if fallback is not None:
            self._next = (start + 1) % max(count, 1)
        return fallback

    def report_failure(self, endpoint: Endpoint, now: float) -> float:
        """Eject ``endpoint``; returns until when (doubling per consecutive failure)."""
        key = (endpoint.host, endpoint.port)
        ejection = self._ejections.get(key)
        failures = 1 if ejection is None else ejection.failures + 1
        until = now + doubling(self._base, failures, self._cap)
        self._ejections[key] = _Ejection(failures, until)
        return until

    def report_success(self, endpoint: Endpoint) -> None:
        self._ejections.pop((endpoint.host, endpoint.port), None)

    def is_ejected(self, endpoint: Endpoint, now: float) -> bool:
        ejection = self._ejections.get((endpoint.host, endpoint.port))
        return ejection is not None and ejection.until > now

    def forget(self, keep: Collection[Endpoint]) -> None:
        """Drop state of endpoints not in ``keep`` (the catalog no longer lists them)."""
        live = {(e.host, e.port) for e in keep}
        for key in [k for k in self._ejections if k not in live]:
            del self._ejections[key]
