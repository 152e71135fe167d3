"""follow_consul against a real Consul (dev mode); index rules and endpoint building as pure tests."""

from __future__ import annotations

import trio

from meshagent.agent.catalog import endpoints_of, follow_consul, next_index
from meshagent.discovery.consul import (
    CheckDefinition,
    CheckStatus,
    ConsulClient,
    ConsulProblem,
    NodeInfo,
    ServiceEntry,
    ServiceInfo,
    ServiceRegistration,
)
from meshagent.snapshot.model import Endpoint
from tests.support.consul import ConsulProcess
from tests.support.net import wait_until


class CountingClient(ConsulClient):
    """The real client, counting the answers and problems of health queries."""

    answers = 0
    problems = 0

    async def health_service(
        self,
        name: str,
        *,
        index: int = 0,
        wait_seconds: float = 0,
        passing_only: bool = True,
    ) -> tuple[int, list[ServiceEntry]]:
        try:
            result = await super().health_service(
                name, index=index, wait_seconds=wait_seconds, passing_only=passing_only
            )
        except ConsulProblem:
            self.problems += 1
            raise
        self.answers += 1
        return result


class Published:
    """Collects publish() calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Endpoint, ...]]] = []

    def __call__(self, service: str, endpoints: tuple[Endpoint, ...]) -> None:
        self.calls.append((service, endpoints))

    def latest(self, service: str) -> tuple[Endpoint, ...] | None:
        found = [endpoints for name, endpoints in self.calls if name == service]
        return found[-1] if found else None

    async def wait_for(
        self, service: str, ports: list[int], *, timeout: float = 5
    ) -> tuple[Endpoint, ...]:
        async def seen() -> bool:
            latest = self.latest(service)
            return latest is not None and [e.port for e in latest] == ports

        await wait_until(seen, timeout=timeout)
        latest = self.latest(service)
        assert latest is not None
        return latest


async def _register(
    client: ConsulClient,
    port: int,
    *,
    status: CheckStatus = "passing",
    mesh: str = "default",
    name: str = "web",
) -> str:
    sid = f"{name}-{mesh}-{port}"
    await client.register_service(
        ServiceRegistration(
            id=sid,
            name=name,
            address="127.0.0.1",
            port=port,
            tags=("version=v1", "plain", "zone=b"),
            meta={"mesh": mesh, "node": "node-b"},
            check=CheckDefinition(check_id=f"{sid}:health", name="health", ttl="60s"),
        )
    )
    assert await client.update_ttl(f"{sid}:health", status, "set by test")
    return sid


async def test_publishes_passing_endpoints_of_our_mesh_and_follows_changes(
    consul: ConsulProcess, nursery: trio.Nursery
) -> None:
    published = Published()
    async with ConsulClient(consul.address) as client:
        await _register(client, 9001)
        b = await _register(client, 9002, status="critical")
        await _register(client, 9003, mesh="other")
        await _register(client, 9004, name="api")

        with trio.fail_after(5):
            await nursery.start(
                lambda task_status: follow_consul(
                    client,
                    mesh="default",
                    services=["web", "api", "web"],
                    publish=published,
                    wait_seconds=30,  # changes must arrive long before the wait ends
                    task_status=task_status,
                )
            )
        [endpoint] = await published.wait_for("web", [9001])
        assert endpoint == Endpoint(
            host="127.0.0.1",
            port=9001,
            service="web",
            node="node-b",
            tags=(("version", "v1"), ("zone", "b")),
        )
        await published.wait_for("api", [9004])

        assert await client.update_ttl(f"{b}:health", "passing", "fixed")
        await published.wait_for("web", [9001, 9002])

        await client.update_ttl("web-default-9001:health", "critical", "broken")
        await published.wait_for("web", [9002])

        await client.deregister_service(b)
        await published.wait_for("web", [])

    calls_of_web = [endpoints for name, endpoints in published.calls if name == "web"]
    ports = [[e.port for e in endpoints] for endpoints in calls_of_web]
    assert ports == [[9001], [9001, 9002], [9002], []]  # published on change only


async def test_keeps_the_last_endpoints_while_consul_is_down(
    consul: ConsulProcess, nursery: trio.Nursery
) -> None:
    published = Published()
    async with CountingClient(consul.address) as client:
        await _register(client, 9001)
        with trio.fail_after(5):
            await nursery.start(
                lambda task_status: follow_consul(
                    client,
                    mesh="default",
                    services=["web"],
                    publish=published,
                    wait_seconds=30,
                    task_status=task_status,
                )
            )
        await published.wait_for("web", [9001])

        await trio.to_thread.run_sync(consul.stop)
        problems = client.problems

        async def failed() -> bool:
            return client.problems > problems

        await wait_until(failed, timeout=10)
        assert [[e.port for e in eps] for _, eps in published.calls] == [[9001]]

        await trio.to_thread.run_sync(consul.start)  # empty state, lower indexes
        answers = client.answers

        async def answered() -> bool:
            return client.answers > answers

        await wait_until(answered, timeout=20)
        # Consul answers "nobody" until the agents re-register: that empty answer is
        # held back (resync grace), so traffic keeps its endpoints meanwhile.
        assert [[e.port for e in eps] for _, eps in published.calls] == [[9001]]
        await _register(client, 9005)
        await published.wait_for("web", [9005], timeout=20)
        nursery.cancel_scope.cancel()


async def test_an_empty_consul_after_restart_wins_once_the_grace_ends(
    consul: ConsulProcess, nursery: trio.Nursery
) -> None:
    published = Published()
    async with ConsulClient(consul.address) as client:
        await _register(client, 9001)
        await nursery.start(
            lambda task_status: follow_consul(
                client,
                mesh="default",
                services=["web"],
                publish=published,
                wait_seconds=0.5,
                resync_grace_seconds=1.0,
                task_status=task_status,
            )
        )
        await published.wait_for("web", [9001])
        await trio.to_thread.run_sync(consul.stop)
        await trio.to_thread.run_sync(consul.start)
        # Nobody registers again: after the grace, the empty answer is the truth.
        await published.wait_for("web", [], timeout=20)
        nursery.cancel_scope.cancel()


async def test_starts_while_consul_is_down(nursery: trio.Nursery) -> None:
    published = Published()
    down = ConsulProcess()  # never started: its port refuses connections
    async with ConsulClient(down.address) as client:
        with trio.fail_after(5):
            await nursery.start(
                lambda task_status: follow_consul(
                    client,
                    mesh="default",
                    services=["web", "api"],
                    publish=published,
                    task_status=task_status,
                )
            )
        assert published.calls == []
        nursery.cancel_scope.cancel()


async def test_queries_are_rate_limited(consul: ConsulProcess, nursery: trio.Nursery) -> None:
    async with CountingClient(consul.address) as client:
        nursery.start_soon(
            lambda: follow_consul(
                client,
                mesh="default",
                services=["web"],
                publish=Published(),
                wait_seconds=0.02,  # Consul answers (nearly) at once, every time
            )
        )
        await trio.sleep(1.0)  # measuring a rate over a window, not synchronising
        assert 1 <= client.answers <= 6  # at most one query per 0.25 s
        nursery.cancel_scope.cancel()


def test_next_index_follows_consuls_rules() -> None:
    assert next_index(0, 42) == 42
    assert next_index(42, 42) == 42  # wait ended without change
    assert next_index(42, 50) == 50
    assert next_index(50, 7) == 0  # went backwards: start over with a fresh read
    assert next_index(0, 0) == 1  # never 0 after an answer: 0 would not block
    assert next_index(5, -3) == 0


def _entry(
    *,
    port: int,
    service_address: str = "",
    meta: dict[str, str] | None = None,
    tags: list[str] | None = None,
) -> ServiceEntry:
    return ServiceEntry(
        node=NodeInfo(node="consul-node", address="10.0.0.9"),
        service=ServiceInfo(
            id=f"web-{port}",
            service="web",
            address=service_address,
            port=port,
            tags=tags,
            meta=meta,
        ),
    )


def test_endpoints_of_builds_sorted_endpoints_of_one_mesh() -> None:
    entries = [
        _entry(port=2, meta={"mesh": "m"}, tags=None),
        _entry(
            port=1,
            service_address="10.0.0.1",
            meta={"mesh": "m", "node": "n1"},
            tags=["b=2", "a=1", "bare", "=x", "c=with=equals"],
        ),
        _entry(port=3, meta={"mesh": "other"}),
        _entry(port=4, meta=None),
    ]
    assert endpoints_of(entries, mesh="m", service="web") == (
        Endpoint(
            host="10.0.0.1",
            port=1,
            service="web",
            node="n1",
            tags=(("a", "1"), ("b", "2"), ("c", "with=equals")),
        ),
        Endpoint(host="10.0.0.9", port=2, service="web", node="consul-node"),
    )
