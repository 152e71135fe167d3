"""SnapshotWatch: a latest-value cell between the control path and the data path."""

from __future__ import annotations

import trio

from meshagent.snapshot.model import Snapshot


class SnapshotWatch:
    """Holds the current snapshot; publishing replaces it whole (never mutates it).

    Readers take ``current`` once per connection. Waiters use ``wait_newer_than``.
    """

    def __init__(self, initial: Snapshot) -> None:
        self._current = initial
        self._changed = trio.Event()

    @property
    def current(self) -> Snapshot:
        return self._current

    def publish(self, snapshot: Snapshot) -> None:
        """Swap in ``snapshot`` if it is newer; wake every waiter. Not async."""
        if snapshot.version <= self._current.version:
            return
        self._current = snapshot
        self._changed.set()
        self._changed = trio.Event()

    async def wait_newer_than(self, version: int) -> Snapshot:
        """Return the first snapshot with a version above ``version``. A cancel point."""
        while self._current.version <= version:
            await self._changed.wait()
        return self._current
