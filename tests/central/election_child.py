"""A stand-in central agent for test_leader_election: campaigns in its own process.

``python -m tests.central.election_child ADDRESS KEY NODE TTL LOCK_DELAY`` prints
``leader`` (flushed) once it leads, then runs until killed, so a test can SIGKILL a
leader that gets no chance to clean up.
"""

from __future__ import annotations

import functools
import sys

import trio

from meshagent.central.election import run_election
from meshagent.discovery.consul import ConsulClient


async def main(address: str, key: str, node: str, ttl: float, lock_delay: float) -> None:
    async with ConsulClient(address) as client, trio.open_nursery() as nursery:
        election = await nursery.start(
            functools.partial(
                run_election, client, key, node, ttl_seconds=ttl, lock_delay_seconds=lock_delay
            )
        )
        await election.wait_leader()
        print("leader", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    address, key, node, ttl, lock_delay = sys.argv[1:6]
    trio.run(main, address, key, node, float(ttl), float(lock_delay))
