"""SnapshotWatch: a latest-value cell between the control path and the data path."""

from __future__ import annotations

import trio

from meshagent.log import get_logger
from meshagent.snapshot.model import Snapshot

log = get_logger("routes")


class SnapshotWatch:
    """Holds the current snapshot; publishing replaces it whole (never mutates it).

    Readers take ``current`` once per connection. Waiters use ``wait_newer_than``.
    """

    def __init__(self, initial: Snapshot, *, warn: bool = True) -> None:
        """``warn``: log route rules a TCP outbound cannot apply, at start and whenever
        the routes change (off in worker processes: the agent process says it once)."""
        self._warn = warn
        if warn:
            warn_tcp_routes(initial)
        self._current = initial
        self._changed = trio.Event()

    @property
    def current(self) -> Snapshot:
        return self._current

    def publish(self, snapshot: Snapshot) -> None:
        """Swap in ``snapshot`` if it is newer; wake every waiter. Not async."""
        if snapshot.version <= self._current.version:
            return
        if self._warn and snapshot.routes != self._current.routes:
            warn_tcp_routes(snapshot)
        self._current = snapshot
        self._changed.set()
        self._changed = trio.Event()

    async def wait_newer_than(self, version: int) -> Snapshot:
        """Return the first snapshot with a version above ``version``. A cancel point."""
        while self._current.version <= version:
            await self._changed.wait()
        return self._current


def warn_tcp_routes(snapshot: Snapshot) -> None:
    """Log each route rule a TCP outbound of ``snapshot`` cannot apply (they are valid
    policy: the same route may serve HTTP outbounds elsewhere)."""
    for problem in snapshot.tcp_route_problems():
        log.warning("route rule ignored", problem=problem)
