"""keep_registered against a real Consul (dev mode) and a real app on loopback."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import trio

import meshagent
from meshagent.agent.registration import (
    build_registration,
    go_duration,
    keep_registered,
    service_id,
)
from meshagent.config.agent import AgentConfig, ConsulSettings, HealthSettings, InboundSettings
from meshagent.config.load import Duration
from meshagent.discovery.consul import ConsulClient
from tests.support.consul import ConsulProcess
from tests.support.net import serve_echo, wait_until


def _config(consul_address: str, app_port: int, *, interval: float = 0.2) -> AgentConfig:
    return AgentConfig(
        mesh="default",
        node="node-a",
        address="127.0.0.1",
        consul=ConsulSettings(address=consul_address, deregister_critical_after=Duration(90)),
        inbound=[
            InboundSettings(
                service="web",
                port=15001,
                app_port=app_port,
                protocol="http",
                tags={"zone": "a", "version": "v2"},
                health=HealthSettings(tcp=True, interval=Duration(interval), timeout=Duration(0.5)),
            )
        ],
    )


async def _start_app(nursery: trio.Nursery) -> tuple[int, trio.CancelScope]:
    """An echo app on a free port, and the scope that stops it."""
    scope = trio.CancelScope()

    async def run(*, task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await serve_echo("127.0.0.1", task_status=task_status)

    port: int = await nursery.start(run)
    return port, scope


@dataclass
class _Running:
    """A started keep_registered task: ``cancel()`` it, ``done`` is set once it returned."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)

    def cancel(self) -> None:
        self.scope.cancel()


async def _start_registration(
    nursery: trio.Nursery, client: ConsulClient, config: AgentConfig
) -> _Running:
    running = _Running()

    async def run(*, task_status: trio.TaskStatus[None]) -> None:
        try:
            with running.scope:
                await keep_registered(client, config, task_status=task_status)
        finally:
            running.done.set()

    await nursery.start(run)
    return running


async def _check_status(client: ConsulClient, sid: str) -> str | None:
    """The status of ``sid``'s TTL check in Consul's catalog, None if not registered."""
    _, entries = await client.health_service("web", passing_only=False)
    for entry in entries:
        if entry.service.id == sid:
            return next(c.status for c in entry.checks or [] if c.check_id == f"{sid}:health")
    return None


def test_registration_describes_the_inbound() -> None:
    config = _config("http://127.0.0.1:8500", 8080, interval=10)
    [inbound] = config.inbound
    registration = build_registration(config, inbound)
    assert service_id(config, inbound) == "meshagent-node-a-web-15001"
    body = msgspec.json.decode(msgspec.json.encode(registration))
    assert body == {
        "ID": "meshagent-node-a-web-15001",
        "Name": "web",
        "Address": "127.0.0.1",
        "Port": 15001,
        "Tags": ["version=v2", "zone=a"],
        "Meta": {
            "mesh": "default",
            "service": "web",
            "version": "v2",
            "protocol": "http",
            "node": "node-a",
            "meshagent_version": meshagent.__version__,
        },
        "Check": {
            "CheckID": "meshagent-node-a-web-15001:health",
            "Name": "web health",
            "TTL": "30s",
            "DeregisterCriticalServiceAfter": "90s",
            "Notes": "TTL check fed by meshagent's health probes of the local app",
            "Status": "critical",
        },
    }


def test_go_duration() -> None:
    assert [go_duration(s) for s in (30, 0.6, 1.5, 3600, 0.0001)] == [
        "30s",
        "600ms",
        "1500ms",
        "3600s",
        "1ms",
    ]


async def test_registers_reports_health_and_deregisters_on_cancel(
    consul: ConsulProcess, nursery: trio.Nursery
) -> None:
    app_port, app = await _start_app(nursery)
    config = _config(consul.address, app_port)
    sid = service_id(config, config.inbound[0])
    async with ConsulClient(consul.address) as client:
        registration = await _start_registration(nursery, client, config)

        async def passing() -> bool:
            return await _check_status(client, sid) == "passing"

        await wait_until(passing, timeout=10)
        _, entries = await client.health_service("web")
        [entry] = entries
        assert (entry.service.address, entry.service.port) == ("127.0.0.1", 15001)
        assert entry.service.tags == ["version=v2", "zone=a"]
        assert (entry.service.meta or {})["mesh"] == "default"

        app.cancel()  # the app goes away: the next probe fails

        async def critical() -> bool:
            return await _check_status(client, sid) == "critical"

        await wait_until(critical, timeout=10)
        _, entries = await client.health_service("web", passing_only=False)
        [entry] = entries
        [check] = [c for c in entry.checks or [] if c.service_id == sid]
        assert check.output == f"tcp 127.0.0.1:{app_port}: connection refused"

        registration.cancel()
        with trio.fail_after(5):
            await registration.done.wait()

        async def gone() -> bool:
            return await _check_status(client, sid) is None

        await wait_until(gone, timeout=5)


async def test_registers_again_after_consul_restarts(
    consul: ConsulProcess, nursery: trio.Nursery
) -> None:
    app_port, _ = await _start_app(nursery)
    config = _config(consul.address, app_port)
    sid = service_id(config, config.inbound[0])
    async with ConsulClient(consul.address) as client:
        registration = await _start_registration(nursery, client, config)

        async def passing() -> bool:
            return await _check_status(client, sid) == "passing"

        await wait_until(passing, timeout=10)
        await trio.to_thread.run_sync(consul.stop)
        await trio.to_thread.run_sync(consul.start)  # same port, empty state
        await wait_until(passing, timeout=20)
        assert not registration.done.is_set()
        registration.cancel()
        with trio.fail_after(5):
            await registration.done.wait()


async def test_starts_while_consul_is_down_and_registers_when_it_comes_up(
    nursery: trio.Nursery,
) -> None:
    app_port, _ = await _start_app(nursery)
    later = ConsulProcess()  # not started yet: its port refuses connections
    config = _config(later.address, app_port)
    sid = service_id(config, config.inbound[0])
    try:
        async with ConsulClient(later.address) as client:
            with trio.fail_after(5):
                registration = await _start_registration(nursery, client, config)
            await trio.to_thread.run_sync(later.start)

            async def passing() -> bool:
                return await _check_status(client, sid) == "passing"

            await wait_until(passing, timeout=20)
            registration.cancel()
            with trio.fail_after(5):
                await registration.done.wait()
    finally:
        await trio.to_thread.run_sync(later.stop)


async def test_cancel_while_consul_is_down_ends_promptly(nursery: trio.Nursery) -> None:
    down = ConsulProcess()  # never started
    config = _config(down.address, 1)
    async with ConsulClient(down.address) as client:
        registration = await _start_registration(nursery, client, config)
        registration.cancel()
        with trio.fail_after(3):  # deregistration is bounded to 2 s
            await registration.done.wait()
