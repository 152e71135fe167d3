"""Two central agents (replicas) on one Consul KV store, as real processes on loopback:
any replica serves the admin API and agents, one elected leader runs the jobs that must
run once, and when the leader is killed (SIGKILL: no clean hand-over) the other takes
over within 2 x session_ttl + lock_delay and does them.

Consul runs with ``session_ttl_min = "1s"`` (its default, 10 s, would make a failover
take over 20 s); the replicas use ``session_ttl = "1s"`` and ``lock_delay = "500ms"``.
Replica B starts from a copy of A's seal key and central CA (``seed_replica``), as an
operator would: a mesh CA sealed by A opens on B, and one ``central-ca.pem`` verifies
both replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from meshagent.agent.central_client import CentralClient, central_tls_context
from meshagent.central.store import ConsulKvStore, NotFound
from meshagent.demo.central import AdminClient, CentralProcess, ConsulStore
from meshagent.demo.consul import ConsulProcess
from meshagent.demo.ports import free_port
from meshagent.discovery.consul import ConsulClient
from meshagent.pki.csr import make_csr
from meshagent.snapshot.wire import InboundSpec, JoinRequest

PREFIX = "meshagent/"
SESSION_TTL = 1.0
LOCK_DELAY = 0.5
# Consul invalidates a dead leader's session up to 2 x TTL after its last renewal and
# keeps the key for the lock-delay; the margin covers the acquire retry and log writes.
FAILOVER_BOUND = 2 * SESSION_TTL + LOCK_DELAY + 3.0
ACQUIRED = "leadership acquired"


@pytest.fixture
def consul() -> Iterator[ConsulProcess]:
    """A dev-mode Consul accepting 1 s sessions (the ``consul`` fixture's, with one setting)."""
    process = ConsulProcess(hcl=['session_ttl_min = "1s"'])
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def replicas(tmp_path: Path, consul: ConsulProcess) -> Iterator[tuple[CentralProcess, CentralProcess]]:
    """A (started first, so it leads; its jobs every hour) and B (jobs every 500 ms)."""
    store = ConsulStore(consul.address, prefix=PREFIX, session_ttl="1s", lock_delay="500ms")
    a = CentralProcess(tmp_path, name="central-a", store=store, leader_jobs_interval="1h")
    b = CentralProcess(
        tmp_path, name="central-b", store=store, secrets_from=a, leader_jobs_interval="500ms"
    )
    try:
        a.start()
        wait_until(lambda: ACQUIRED in a.output(), 10, "central-a leads")
        b.start()
        # B is campaigning: its session exists (a debug line) and it did not win.
        wait_until(lambda: "session created" in b.output(), 10, "central-b campaigns")
        yield a, b
    finally:
        b.stop()
        a.stop()


def wait_until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``predicate`` (every 50 ms) until true; how long it took. Fails after ``within``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError(f"not within {within:g} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def leaders(*replicas: CentralProcess) -> list[str]:
    return [r.name for r in replicas if ACQUIRED in r.output()]


def join_request(name: str) -> JoinRequest:
    return JoinRequest(
        mesh="shop", dataplane=name, node=f"host-{name}", address="127.0.0.2",
        inbounds=[InboundSpec(service="web", port=15443)],
        csrs={"web": make_csr("shop", "web")[0].decode()},
    )


async def test_two_replicas_share_the_store_and_the_survivor_takes_over(
    replicas: tuple[CentralProcess, CentralProcess], consul: ConsulProcess
) -> None:
    a, b = replicas
    blocking = trio.to_thread.run_sync
    tls = central_tls_context(str(a.ca))  # A's central CA file verifies both replicas
    assert b.ca.read_bytes() == a.ca.read_bytes()
    assert (b.data / "seal.key").read_bytes() == (a.data / "seal.key").read_bytes()

    # Exactly one leader, and the leader key names it.
    assert leaders(a, b) == ["central-a"]
    async with ConsulClient(consul.address) as client:
        _, entry = await client.kv_get(f"{PREFIX}leader")
    assert entry is not None and f":{a.port}" in (entry.value or b"").decode()

    # A mesh made through A is visible through B (with A's own admin token and CA).
    def admin_on(replica: CentralProcess, **call: Any) -> Any:
        with AdminClient(replica.url, a.ca, a.admin_token) as admin:
            return admin.call(**call)

    await blocking(partial(admin_on, a, method="POST", path="/v1/meshes", json={"name": "shop"}))
    shop = await blocking(partial(admin_on, b, method="GET", path="/v1/meshes/shop"))
    assert shop["name"] == "shop"
    join_token = (await blocking(partial(
        admin_on, b, method="POST", path="/v1/meshes/shop/tokens", json={"services": ["web"]}
    )))["token"]

    # A dataplane joins through A (its CSR signed with the mesh CA that A sealed) ...
    async with CentralClient(a.url, tls) as central_a:
        joined = await central_a.join(join_token, join_request("web-1"))
    # ... and B serves its config (B unseals the same CA: its bundle matches).
    async with CentralClient(b.url, tls) as central_b:
        config = await central_b.config(joined.node_token, "shop", "web-1", after=0, wait_seconds=0)
    assert config.mesh == "shop" and config.version >= 1 and config.ca_bundle == joined.ca_bundle

    # A join token that expires before the failover. A's jobs run hourly (their first
    # run was before the token existed), so the token stays in the store expired ...
    short = await blocking(partial(
        admin_on, a, method="POST", path="/v1/meshes/shop/tokens",
        json={"services": ["web"], "ttl": "1s"},
    ))
    await trio.sleep(max(0.0, short["expires_at"] - time.time()) + 0.2)
    async with ConsulClient(consul.address) as client:
        store = ConsulKvStore(client, PREFIX)
        expired = await store.get_token(short["id"])
        assert expired.expires_at is not None and expired.expires_at <= time.time()

        # ... until the leader is killed and the other one takes over and purges it.
        pid = a.pid
        assert pid is not None
        killed = time.monotonic()
        await blocking(a.kill)
        took = await blocking(partial(wait_until, lambda: ACQUIRED in b.output(), FAILOVER_BOUND, "central-b takes over"))
        print(f"failover after SIGKILL of pid {pid}: {took:.2f} s (bound {FAILOVER_BOUND:g} s)")
        assert leaders(b) == ["central-b"]

        async def purged() -> None:
            while True:
                try:
                    await store.get_token(short["id"])
                except NotFound:
                    return
                await trio.sleep(0.05)

        with trio.fail_after(5):
            await purged()
        assert time.monotonic() - killed < FAILOVER_BOUND + 5
        _, entry = await client.kv_get(f"{PREFIX}leader")
        assert entry is not None and f":{b.port}" in (entry.value or b"").decode()
    assert any(
        "expired tokens purged" in line and "count=1" in line for line in b.output().splitlines()
    ), b.output()

    # B keeps serving the dataplane that joined through A (an agent would need B's URL:
    # agent.toml names one central URL today), and the orphan job kept its credential.
    async with CentralClient(b.url, tls) as central_b:
        again = await central_b.config(joined.node_token, "shop", "web-1", after=0, wait_seconds=0)
    assert again.version == config.version
    assert "node credentials no dataplane names purged" not in b.output()


# ---------------------------------------------------------------------------- an agent that lists both


@pytest.fixture
def short_lived_replicas(
    tmp_path: Path, consul: ConsulProcess
) -> Iterator[tuple[CentralProcess, CentralProcess]]:
    """A and B as above, signing 9 s certificates (agents renew every 6 s) and asking
    for a heartbeat every second."""
    store = ConsulStore(consul.address, prefix=PREFIX, session_ttl="1s", lock_delay="500ms")
    a = CentralProcess(tmp_path, name="central-a", store=store, cert_ttl="9s",
                       heartbeat_interval="1s")
    b = CentralProcess(tmp_path, name="central-b", store=store, secrets_from=a, cert_ttl="9s",
                       heartbeat_interval="1s")
    try:
        a.start()
        wait_until(lambda: ACQUIRED in a.output(), 10, "central-a leads")
        b.start()
        yield a, b
    finally:
        b.stop()
        a.stop()


def test_an_agent_listing_both_replicas_moves_to_the_survivor(
    tmp_path: Path, short_lived_replicas: tuple[CentralProcess, CentralProcess]
) -> None:
    from tests.e2e.harness import start_agent, start_app
    from tests.e2e.test_central_mesh import joined_config, round_trip
    from tests.e2e.test_central_offline import snapshot_of

    a, b = short_lived_replicas
    with AdminClient(a.url, a.ca, a.admin_token) as on_a:
        on_a.create_mesh("shop")
        token = on_a.join_token("shop", ["orders"])
    echo, echo_port = start_app("echo", tmp_path, name="echo")
    config = joined_config(
        a, tmp_path, "orders-1", "127.0.0.3", token,
        inbound={"service": "orders", "port": free_port("127.0.0.3"), "app_port": echo_port},
        outbound=[{"service": "orders", "port": free_port(), "source": "orders"}],
    )
    config["central"]["url"] = [a.url, b.url]  # A first: the agent joins through A
    agent = start_agent(config, tmp_path, "orders-1")
    try:
        with AdminClient(b.url, a.ca, a.admin_token) as on_b:

            def up_to_date() -> bool:
                views = on_b.dataplanes("shop")
                return len(views) == 1 and views[0]["online"] and (
                    views[0]["applied_version"] == views[0]["latest_version"])

            wait_until(up_to_date, 15, "the agent joined and applied its config")
            assert "using another central agent" not in agent.output()
            wait_until(lambda: agent.output().count("certificates renewed") >= 1, 15,
                       "a renewal through A")
            port = config["outbound"][0]["port"]
            assert round_trip(port)

            a.kill()  # the replica in use, without a clean stop
            killed = time.monotonic()
            took = wait_until(lambda: "using another central agent of central.url" in agent.output(),
                              15, "the agent moves to B")
            print(f"agent moved to the surviving replica {took:.2f} s after SIGKILL of the one in use")
            assert f"url={b.url}" in agent.output()
            renewed = agent.output().count("certificates renewed")
            wait_until(lambda: agent.output().count("certificates renewed") > renewed, 15,
                       "a renewal through B")
            # A change made now reaches the agent through B's long poll.
            on_b.set_mesh("shop", mtls="permissive")
            wait_until(lambda: snapshot_of(config).get("mtls") == "permissive", 15,
                       "the agent applies a config from B")
            print(f"config change from B applied {time.monotonic() - killed:.2f} s after the kill")
            wait_until(up_to_date, 10, "B sees the agent's reports")
            assert round_trip(port)
    finally:
        agent.stop()
        echo.stop()
