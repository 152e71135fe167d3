"""Leader election with a Consul session: the central agent replicas that share one
Consul elect one leader to do the jobs that must run once.

A session (TTL, lock delay, release on invalidation) acquires a leader key. The leader
renews the session every TTL/3 and steps down on its own side when renewals have failed
for one TTL; Consul expires a lost leader's session after at most 2 x TTL, and the key
can be taken lock-delay later. A clean stop releases the key before destroying the
session, so the next replica takes over at once.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Final

import trio

from meshagent.discovery.consul import (
    Backoff,
    ConsulClient,
    ConsulError,
    ConsulProblem,
)
from meshagent.log import get_logger

log = get_logger("central.election")

STOPPED: Final = "stopped"


class _SessionLost(Exception):
    """Consul no longer knows our session (expired, destroyed, or Consul lost its state)."""


class LeaderElection:
    """One leader among replicas, by a Consul session holding the lock on ``key``.

    Theory of operation:

    * ``run`` creates a session (TTL ``ttl_seconds``, lock-delay ``lock_delay_seconds``,
      behavior release) and runs two tasks: one renews it every TTL/3; the other tries
      to acquire ``key`` whenever it is free and otherwise watches it with blocking
      queries (so a release is seen at once, and a failed acquire during a lock-delay is
      retried every ``acquire_retry_seconds``).
    * We are leader while the key's lock holder is our session *and* our lease is valid:
      Consul keeps a session at least TTL after a renewal (it invalidates at 2 x TTL), so
      when renewals fail for TTL since the last one that succeeded, we step down on our
      side even before Consul says anything. A renewal that succeeds later, while the
      key is still ours, makes us leader again.
    * Session gone (renew answers 404): step down, create a new session, campaign again.
      Consul unreachable: both tasks retry with capped, jittered backoff.
    * On exit (cancellation): step down, release the key (no lock-delay, so another
      replica takes over at once), destroy the session; shielded, bounded to 2 s. A
      replica that dies without this is replaced after its session expires (at most
      2 x TTL) plus the lock-delay.
    * Transitions are logged: ``leadership acquired``, ``leadership lost`` (warning, with
      the reason) and ``leadership given up`` (on a clean stop).
    * ``wait_leader`` / ``wait_not_leader`` wait for a transition; after ``run`` ends
      (cancelled) nobody is leader and ``wait_leader`` waits forever.

    Usage::

        async with trio.open_nursery() as nursery:
            election = await nursery.start(run_election, consul, key, node_name)
            await election.wait_leader()
    """

    def __init__(
        self,
        consul: ConsulClient,
        key: str,
        node_name: str,
        *,
        ttl_seconds: float = 10.0,
        lock_delay_seconds: float = 1.0,
        watch_wait_seconds: float = 30.0,
        acquire_retry_seconds: float = 0.25,
        rng: random.Random | None = None,
    ) -> None:
        self._consul = consul
        self.key = key
        self.node_name = node_name
        self.ttl_seconds = ttl_seconds
        self.lock_delay_seconds = lock_delay_seconds
        self._watch_wait_seconds = watch_wait_seconds
        self._acquire_retry_seconds = acquire_retry_seconds
        self._rng = rng or random.Random()
        self._session: str | None = None
        self._holder: str | None = None  # the key's lock holder, as last seen
        self._leader_node: str | None = None
        self._lease_until = -math.inf
        self._leader = False
        self._changed = trio.Event()
        self._started: Callable[[], None] = lambda: None

    @property
    def is_leader(self) -> bool:
        """Do we hold the leader key with a valid lease? Never blocks."""
        return self._leader

    @property
    def leader_node(self) -> str | None:
        """The node holding the key as last seen (None: nobody, or not known yet)."""
        return self._leader_node

    @property
    def session_id(self) -> str | None:
        """Our current Consul session, if any."""
        return self._session

    async def wait_leader(self) -> None:
        """Return once we are leader (at once if we are). Cancel point."""
        while not self._leader:
            await self._changed.wait()

    async def wait_not_leader(self) -> None:
        """Return once we are not leader (at once if we are not). Cancel point.

        A leader's jobs run in a nursery that this cancels::

            async with trio.open_nursery() as jobs:
                jobs.start_soon(purge_tokens_forever, store)
                await election.wait_not_leader()
                jobs.cancel_scope.cancel()
        """
        while self._leader:
            await self._changed.wait()

    async def run(
        self, *, task_status: trio.TaskStatus[LeaderElection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Campaign until cancelled. Cancel point; never returns.

        ``task_status.started(self)`` comes after the first attempt to acquire the key
        (or the first failure to reach Consul), so ``is_leader`` is then meaningful.

        Raises:
            ConsulError: before ``started``, Consul refused to create the session (ACL
                denied, TTL outside its range): a configuration error. Later ones are
                logged and retried.
        """
        started = False

        def mark_started() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started(self)

        self._started = mark_started
        backoff = Backoff(
            initial=min(0.5, self.ttl_seconds / 4),
            maximum=min(10.0, self.ttl_seconds),
            rng=self._rng,
        )
        reported = False
        try:
            while True:
                try:
                    await self._hold_one_session()
                except ConsulError as exc:
                    if not started:
                        raise
                    log.error("leader election failing", key=self.key, error=str(exc))
                except ConsulProblem as exc:
                    if not reported:
                        log.warning(
                            "leader election waiting for consul", key=self.key, error=str(exc)
                        )
                    reported = True
                else:  # a session ended after a while: start the next one quickly
                    reported = False
                    backoff.reset()
                mark_started()
                await trio.sleep(backoff.next_delay())
        finally:
            self._session = None
            self._holder = None
            self._update(STOPPED)

    async def _hold_one_session(self) -> None:
        """Create a session and campaign with it until it is lost. Cancel point.

        Raises:
            ConsulProblem: the session could not be created.
        """
        before = trio.current_time()
        session = await self._consul.session_create(
            name=f"meshagent-central {self.node_name}",
            ttl_seconds=self.ttl_seconds,
            lock_delay_seconds=self.lock_delay_seconds,
        )
        self._session = session
        self._lease_until = before + self.ttl_seconds
        self._holder = None  # unknown: try to acquire at once
        log.debug("session created", key=self.key, session=session)
        reason = "session ended"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_session, session)
                nursery.start_soon(self._campaign, session)
        except* _SessionLost:
            reason = "session expired or destroyed"
            log.warning("session lost", key=self.key, session=session)
        except* trio.Cancelled:
            reason = STOPPED
            raise
        finally:
            held = self._holder == session
            self._session = None
            self._update(reason)
            await self._give_up(session, held=held)

    async def _keep_session(self, session: str) -> None:
        """Renew the session every TTL/3; step down when the lease runs out. Cancel point.

        Raises:
            _SessionLost: Consul does not know the session any more.
        """
        interval = self.ttl_seconds / 3
        retry = max(0.05, interval / 4)
        next_attempt = trio.current_time() + interval
        failures = 0
        while True:
            await trio.sleep_until(min(next_attempt, self._lease_deadline()))
            self._update("lease ran out: consul did not confirm the session in time")
            if trio.current_time() < next_attempt:
                continue
            sent = trio.current_time()
            renewed: bool | None = None
            with trio.move_on_at(min(sent + interval, self._lease_deadline(sent))):
                try:
                    renewed = await self._consul.session_renew(session)
                except ConsulProblem as exc:
                    if failures == 0:
                        log.warning(
                            "session renewal failing", key=self.key, error=str(exc)
                        )
            if renewed is False:
                raise _SessionLost
            if renewed:
                if failures:
                    log.info("session renewed again", key=self.key, failures=failures)
                failures = 0
                self._lease_until = sent + self.ttl_seconds
                next_attempt = sent + interval
            else:
                failures += 1
                next_attempt = trio.current_time() + retry
            self._update("lease ran out: consul did not confirm the session in time")

    def _lease_deadline(self, now: float | None = None) -> float:
        """When the lease ends, or +inf when it already did (nothing left to wait for)."""
        now = trio.current_time() if now is None else now
        return self._lease_until if self._lease_until > now else math.inf

    async def _campaign(self, session: str) -> None:
        """Acquire the key when free; watch it otherwise. Cancel point; never returns."""
        backoff = Backoff(
            initial=min(0.5, self.ttl_seconds / 4),
            maximum=min(10.0, self.ttl_seconds),
            rng=self._rng,
        )
        index = 0
        failing = False
        while True:
            try:
                acquired = self._holder is None and await self._consul.kv_put(
                    self.key, self.node_name.encode(), acquire=session
                )
                if acquired:
                    self._holder = session
                    self._leader_node = self.node_name
                    self._update("acquired")
                self._started()
                wait = (
                    self._acquire_retry_seconds
                    if self._holder is None
                    else self._watch_wait_seconds
                )
                new_index, entry = await self._consul.kv_get(
                    self.key, index=index, wait_seconds=wait
                )
                index = 0 if new_index < index else max(new_index, 1)
                self._holder = None if entry is None else entry.session
                self._leader_node = None
                if entry is not None and entry.session is not None:
                    self._leader_node = (entry.value or b"").decode(errors="replace") or None
                self._update("the leader key was released or taken over")
                backoff.reset()
                if failing:
                    log.info("leader key reachable again", key=self.key)
                failing = False
            except ConsulProblem as exc:
                if not failing:  # once per outage
                    log.warning("leader key unreachable", key=self.key, error=str(exc))
                failing = True
                self._started()
                await trio.sleep(backoff.next_delay())

    async def _give_up(self, session: str, *, held: bool) -> None:
        """Release the key (if held) and destroy the session; shielded, at most 2 s."""
        with trio.CancelScope(shield=True), trio.move_on_after(2.0) as scope:
            try:
                if held:
                    await self._consul.kv_put(self.key, b"", release=session)
                await self._consul.session_destroy(session)
            except ConsulProblem as exc:
                log.warning(
                    "could not end the session; it expires by its TTL",
                    key=self.key,
                    session=session,
                    error=str(exc),
                )
        if scope.cancelled_caught:
            log.warning(
                "could not end the session in time; it expires by its TTL",
                key=self.key,
                session=session,
            )

    def _update(self, reason: str) -> None:
        """Recompute ``is_leader``; on a change, log it and wake the waiters."""
        leader = (
            self._session is not None
            and self._holder == self._session
            and trio.current_time() < self._lease_until
        )
        if leader == self._leader:
            return
        self._leader = leader
        if leader:
            log.info(
                "leadership acquired", key=self.key, node=self.node_name, session=self._session
            )
        elif reason == STOPPED:
            log.info("leadership given up", key=self.key, node=self.node_name)
        else:
            log.warning(
                "leadership lost", key=self.key, node=self.node_name, reason=reason
            )
        self._changed.set()
        self._changed = trio.Event()


async def run_election(
    consul: ConsulClient,
    key: str,
    node_name: str,
    *,
    ttl_seconds: float = 10.0,
    lock_delay_seconds: float = 1.0,
    task_status: trio.TaskStatus[LeaderElection] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a ``LeaderElection`` until cancelled; ``nursery.start`` returns it.

    ``ttl_seconds`` must be within Consul's ``session_ttl_min`` (10 s by default) and
    24 h. Cancel point; never returns. Raises ConsulError as ``LeaderElection.run``.
    """
    election = LeaderElection(
        consul, key, node_name, ttl_seconds=ttl_seconds, lock_delay_seconds=lock_delay_seconds
    )
    await election.run(task_status=task_status)


__all__ = ["STOPPED", "LeaderElection", "run_election"]
