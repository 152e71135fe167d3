"""ConsulClient against a real Consul 1.8.7 in dev mode on loopback."""

from __future__ import annotations

import random
import uuid

import pytest
import trio

from meshagent.demo.ports import free_port
from meshagent.discovery.consul import (
    Backoff,
    CheckDefinition,
    ConsulClient,
    ConsulError,
    ConsulUnavailable,
    ServiceRegistration,
)
from tests.support.consul import ConsulProcess


def _registration(
    service_id: str = "web-1", *, name: str = "web", port: int = 8080
) -> ServiceRegistration:
    return ServiceRegistration(
        id=service_id,
        name=name,
        address="127.0.0.2",
        port=port,
        tags=("version=v1", "zone=a"),
        meta={"mesh": "default", "version": "v1"},
        check=CheckDefinition(
            check_id=f"{service_id}:health",
            name="app health",
            ttl="30s",
            deregister_critical_service_after="1h",
            notes="set by a test",
            status="critical",
        ),
    )


async def test_register_ttl_health_deregister_round_trip(consul: ConsulProcess) -> None:
    async with ConsulClient(consul.address) as client:
        await client.register_service(_registration())

        index, entries = await client.health_service("web", passing_only=False)
        assert index > 0
        [entry] = entries
        assert entry.service.id == "web-1"
        assert entry.service.service == "web"
        assert entry.service.address == "127.0.0.2"
        assert entry.service.port == 8080
        assert entry.service.tags == ["version=v1", "zone=a"]
        assert entry.service.meta == {"mesh": "default", "version": "v1"}
        assert entry.node.node == consul.node
        assert entry.node.address == "127.0.0.1"
        statuses = {c.check_id: c.status for c in entry.checks or []}
        assert statuses["web-1:health"] == "critical"
        assert (await client.health_service("web"))[1] == []  # not passing yet

        assert await client.update_ttl("web-1:health", "passing", "all good") is True
        _, entries = await client.health_service("web")
        [entry] = entries
        [check] = [c for c in entry.checks or [] if c.check_id == "web-1:health"]
        assert (check.status, check.output, check.service_id) == ("passing", "all good", "web-1")

        await client.deregister_service("web-1")
        _, entries = await client.health_service("web", passing_only=False)
        assert entries == []
        # Idempotent: deregistering what is gone is not an error.
        await client.deregister_service("web-1")


async def test_update_ttl_of_unknown_check_returns_false(consul: ConsulProcess) -> None:
    async with ConsulClient(consul.address) as client:
        assert await client.update_ttl("no-such-check", "passing", "x") is False


async def test_register_replaces_existing_checks(consul: ConsulProcess) -> None:
    async with ConsulClient(consul.address) as client:
        await client.register_service(_registration())
        replaced = ServiceRegistration(
            id="web-1",
            name="web",
            port=8080,
            check=CheckDefinition(check_id="web-1:other", name="other", ttl="30s"),
        )
        await client.register_service(replaced)
        _, entries = await client.health_service("web", passing_only=False)
        [entry] = entries
        service_checks = {c.check_id for c in entry.checks or [] if c.service_id == "web-1"}
        assert service_checks == {"web-1:other"}


async def test_blocking_query_returns_on_change(
    consul: ConsulProcess, nursery: trio.Nursery
) -> None:
    async with ConsulClient(consul.address) as client:
        index, entries = await client.health_service("web", passing_only=False)
        assert entries == []
        answered = trio.Event()
        result: list[int] = []

        async def block() -> None:
            new_index, _ = await client.health_service(
                "web", index=index, wait_seconds=20, passing_only=False
            )
            result.append(new_index)
            answered.set()

        nursery.start_soon(block)
        await client.register_service(_registration())
        with trio.fail_after(10):  # far below the 20 s wait: the change woke it up
            await answered.wait()
        assert result[0] > index


async def test_blocking_query_times_out_on_consuls_side_not_ours(
    consul: ConsulProcess,
) -> None:
    async with ConsulClient(consul.address, timeout_seconds=0.5) as client:
        index, _ = await client.health_service("web")
        with trio.fail_after(10):
            new_index, entries = await client.health_service("web", index=index, wait_seconds=1)
        assert (new_index, entries) == (index, [])


async def test_acl_token_is_sent() -> None:
    token = str(uuid.uuid4())
    acl_consul = ConsulProcess(acl_master_token=token)
    await trio.to_thread.run_sync(acl_consul.start)
    try:
        async with ConsulClient(acl_consul.address) as anonymous:
            with pytest.raises(ConsulError) as denied:
                await anonymous.register_service(_registration())
        message = str(denied.value)
        assert acl_consul.address in message
        assert "403" in message and "Permission denied" in message
        assert "\n" not in message

        async with ConsulClient(acl_consul.address, token=token) as client:
            await client.register_service(_registration())
            _, entries = await client.health_service("web", passing_only=False)
        assert [e.service.id for e in entries] == ["web-1"]
    finally:
        await trio.to_thread.run_sync(acl_consul.stop)


async def test_unreachable_consul_is_unavailable_with_address() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    async with ConsulClient(address) as client:
        with pytest.raises(ConsulUnavailable) as failed:
            await client.register_service(_registration())
    assert str(failed.value) == f"consul at {address} unreachable: connection refused"


async def test_silent_consul_times_out(nursery: trio.Nursery) -> None:
    # A listener that accepts and never answers: the request must end at its deadline.
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def accept_and_hold() -> None:
        async with listener:
            while True:
                accepted.append(await listener.accept())

    nursery.start_soon(accept_and_hold)
    address = f"http://127.0.0.1:{port}"
    async with ConsulClient(address, timeout_seconds=0.3) as client:
        with trio.fail_after(5), pytest.raises(ConsulUnavailable) as failed:
            await client.update_ttl("x", "passing", "")
    assert str(failed.value) == f"consul at {address} unreachable: no answer within 0.3s"
    for stream in accepted:
        await stream.aclose()
    nursery.cancel_scope.cancel()


async def test_bad_request_is_consul_error(consul: ConsulProcess) -> None:
    async with ConsulClient(consul.address) as client:
        with pytest.raises(ConsulError, match=r"HTTP 400: Invalid check status"):
            await client.update_ttl("x", "bogus", "")  # type: ignore[arg-type]


def test_address_must_be_a_url() -> None:
    with pytest.raises(ConsulError, match="not an http"):
        ConsulClient("127.0.0.1:8500")


def test_backoff_stays_within_bounds_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(50)]
    assert all(0.5 <= d <= 10.0 for d in delays)
    assert max(delays) > 5.0  # it does grow
    backoff.reset()
    assert backoff.next_delay() <= 1.5
