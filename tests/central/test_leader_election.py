"""LeaderElection against a real Consul: one leader; handover on stop, death, session
loss and a Consul restart. Waits poll the elections' state under bounded deadlines.

Most tests use ``short_ttl_consul`` (sessions from 1 s) so expiry takes seconds. Consul
invalidates a session up to 2 x TTL after its last renewal, then keeps its locks for
the lock-delay: a dead leader is replaced within 2 x TTL + lock-delay (+ our margin).
"""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from meshagent.central.election import LeaderElection, run_election
from meshagent.demo.consul import ConsulProcess
from meshagent.discovery.consul import ConsulClient, ConsulError

KEY = "meshagent/central/leader"
TTL = 1.0
LOCK_DELAY = 0.5
MARGIN = 1.5
REPO_ROOT = Path(__file__).resolve().parents[2]


async def eventually(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``predicate`` until true; return how long it took. Fails after ``within``."""
    start = trio.current_time()
    try:
        with trio.fail_after(within):
            while not predicate():
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"not within {within:g}s: {what}") from None
    return trio.current_time() - start


def leaders(elections: Sequence[LeaderElection]) -> list[str]:
    return [e.node_name for e in elections if e.is_leader]


class Replica:
    """One election with its own Consul client, stoppable on its own."""

    def __init__(self, election: LeaderElection, scope: trio.CancelScope) -> None:
        self.election = election
        self.scope = scope


@asynccontextmanager
async def replicas(
    address: str, nodes: Sequence[str], **options: float
) -> AsyncIterator[list[Replica]]:
    async with trio.open_nursery() as nursery:
        started: list[Replica] = []
        for node in nodes:
            scope = trio.CancelScope()

            async def campaign(
                node: str = node,
                scope: trio.CancelScope = scope,
                *,
                task_status: trio.TaskStatus[LeaderElection] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with scope:
                    async with ConsulClient(address) as client:
                        await run_election(client, KEY, node, task_status=task_status, **options)

            election = await nursery.start(campaign)
            started.append(Replica(election, scope))
        yield started
        nursery.cancel_scope.cancel()


async def holder_session(address: str) -> str | None:
    async with ConsulClient(address) as client:
        _, entry = await client.kv_get(KEY)
    return None if entry is None else entry.session


async def test_one_leader_and_a_stopped_leader_hands_over_at_once(consul: ConsulProcess) -> None:
    # Consul's default session_ttl_min (10 s) and the default TTL and lock-delay.
    async with replicas(consul.address, ["central-a", "central-b"]) as (a, b):
        both = [a.election, b.election]
        await eventually(lambda: len(leaders(both)) == 1, 5, "one leader")
        with trio.move_on_after(0.5):  # never two at once, sampled for a while
            while True:
                assert len(leaders(both)) == 1
                await trio.sleep(0.01)
        leader, follower = (a, b) if a.election.is_leader else (b, a)
        assert await holder_session(consul.address) == leader.election.session_id
        await eventually(
            lambda: follower.election.leader_node == leader.election.node_name, 2, "leader seen"
        )
        old_session = leader.election.session_id
        assert old_session is not None

        leader.scope.cancel()  # a clean stop: releases the key, destroys the session
        took = await eventually(lambda: follower.election.is_leader, 3, "takeover after a stop")
        assert took < 1.0  # a release has no lock-delay
        assert not leader.election.is_leader
        async with ConsulClient(consul.address) as client:
            assert await client.session_renew(old_session) is False  # destroyed


async def test_a_killed_leader_is_replaced_after_its_session_expires(
    short_ttl_consul: ConsulProcess,
) -> None:
    address = short_ttl_consul.address
    child = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "tests.central.election_child",
            address,
            KEY,
            "central-doomed",
            str(TTL),
            str(LOCK_DELAY),
        ],
        stdout=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    try:
        assert child.stdout is not None
        output = b""
        with trio.fail_after(15):
            while b"leader\n" not in output:
                chunk = await child.stdout.receive_some()
                assert chunk, "the child exited before leading"
                output += chunk
        async with replicas(
            address, ["central-survivor"], ttl_seconds=TTL, lock_delay_seconds=LOCK_DELAY
        ) as [survivor]:
            await eventually(
                lambda: survivor.election.leader_node == "central-doomed", 3, "child seen"
            )
            assert not survivor.election.is_leader
            child.kill()  # SIGKILL: no release, no session destroy
            await child.wait()
            bound = 2 * TTL + LOCK_DELAY + MARGIN
            took = await eventually(
                lambda: survivor.election.is_leader, bound, "takeover after a kill"
            )
            assert took >= LOCK_DELAY  # the dead session's lock-delay was honoured
    finally:
        if child.returncode is None:
            child.kill()
        with trio.CancelScope(shield=True):
            await child.wait()
            if child.stdout is not None:
                await child.stdout.aclose()


async def test_a_lost_session_steps_down_and_the_election_goes_on(
    short_ttl_consul: ConsulProcess,
) -> None:
    address = short_ttl_consul.address
    async with replicas(
        address, ["central-a", "central-b"], ttl_seconds=TTL, lock_delay_seconds=LOCK_DELAY
    ) as (a, b):
        both = [a.election, b.election]
        await eventually(lambda: len(leaders(both)) == 1, 5, "one leader")
        leader = a if a.election.is_leader else b
        lost = leader.election.session_id
        assert lost is not None
        async with ConsulClient(address) as client:
            await client.session_destroy(lost)  # e.g. an operator, or Consul lost the node
        await eventually(lambda: not leader.election.is_leader, 2, "the leader steps down")
        await eventually(
            lambda: leader.election.session_id not in (None, lost), TTL + MARGIN, "a new session"
        )
        await eventually(
            lambda: len(leaders(both)) == 1, LOCK_DELAY + TTL + MARGIN, "a leader again"
        )


async def test_leader_steps_down_while_consul_is_away_and_one_leads_after(
    short_ttl_consul: ConsulProcess,
) -> None:
    address = short_ttl_consul.address
    async with replicas(
        address, ["central-a", "central-b"], ttl_seconds=TTL, lock_delay_seconds=LOCK_DELAY
    ) as (a, b):
        both = [a.election, b.election]
        await eventually(lambda: len(leaders(both)) == 1, 5, "one leader")
        await trio.to_thread.run_sync(short_ttl_consul.stop)
        # Renewals fail: the lease runs out TTL after the last renewal, at the latest.
        await eventually(lambda: leaders(both) == [], TTL + MARGIN, "no leader without Consul")
        await trio.to_thread.run_sync(short_ttl_consul.start)  # dev mode: state lost
        await eventually(lambda: len(leaders(both)) == 1, 4 * TTL + MARGIN, "a leader again")
        with trio.move_on_after(0.3):
            while True:
                assert len(leaders(both)) <= 1
                await trio.sleep(0.01)


async def test_a_ttl_consul_refuses_fails_at_start(consul: ConsulProcess) -> None:
    async with ConsulClient(consul.address) as client, trio.open_nursery() as nursery:
        with pytest.raises(ConsulError, match="Invalid Session TTL"), trio.fail_after(10):
            await nursery.start(functools.partial(run_election, client, KEY, "x", ttl_seconds=1))
