"""Policies for an agent without a central agent: ``policies = "<file or dir>"`` in
agent.toml, compiled into the routes of this agent's outbounds, reloaded on SIGHUP."""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from meshagent.agent.watch import SnapshotWatch
from meshagent.config.agent import AgentConfig
from meshagent.log import get_logger
from meshagent.policy.compile import (
    compile_permissions,
    compile_request_policies,
    compile_route,
    select_route,
)
from meshagent.policy.load import PolicyError, load_paths
from meshagent.policy.model import Resource
from meshagent.snapshot.model import OutboundRoutes, RequestPolicy, Snapshot

log = get_logger("policies")


@dataclass(frozen=True, slots=True)
class CompiledPolicies:
    routes: dict[str, OutboundRoutes]
    permissions: dict[str, tuple[str, ...]]
    request_policies: dict[str, RequestPolicy]

    def apply(self, snapshot: Snapshot) -> Snapshot:
        """``snapshot`` with these routes and permissions, one version up."""
        return msgspec.structs.replace(
            snapshot,
            version=snapshot.version + 1,
            routes=self.routes,
            permissions=self.permissions,
            request_policies=self.request_policies,
        )


def load_policies(config: AgentConfig) -> CompiledPolicies:
    """Routes for every outbound (an implicit one where no TrafficRoute applies) and
    the TrafficPermissions of every inbound.

    Raises:
        PolicyError: with every problem of every policy file. Blocking (reads files).
    """
    resources = load_paths([Path(config.policies)]) if config.policies else []
    permissions = compile_permissions(
        resources, mesh=config.mesh, destinations=[i.service for i in config.inbound]
    )
    routes = _routes(config, resources)
    services = {s for r in routes.values() for s in r.services()}
    return CompiledPolicies(
        routes=routes,
        permissions=permissions,
        request_policies=compile_request_policies(
            resources, mesh=config.mesh, services=services
        ),
    )


def _routes(config: AgentConfig, resources: Sequence[Resource]) -> dict[str, OutboundRoutes]:
    return {
        o.service: compile_route(
            select_route(
                resources,
                mesh=config.mesh,
                source=config.outbound_source(o),
                destination=o.service,
            ),
            o.service,
        )
        for o in config.outbound
    }


def discovered_services(snapshot: Snapshot, static: Sequence[str]) -> list[str]:
    """The services whose endpoints come from the catalog: every service a route can
    send to, less those with fixed endpoints in agent.toml."""
    wanted: set[str] = {o.service for o in snapshot.outbounds}
    if snapshot.routes:
        wanted = {o.service for o in snapshot.outbounds if o.service not in snapshot.routes}
        for routes in snapshot.routes.values():
            wanted |= routes.services()
    return sorted(wanted - set(static))


class WatchedServices:
    """The set of services the catalog follows; ``update`` wakes the follower."""

    def __init__(self, services: list[str]) -> None:
        self.services = services
        self.changed = trio.Event()

    def update(self, services: list[str]) -> None:
        if services != self.services:
            self.services = services
            self.changed.set()
            self.changed = trio.Event()


async def reload_on_sighup(
    config: AgentConfig,
    watch: SnapshotWatch,
    watched: WatchedServices,
    static: Sequence[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """On each SIGHUP, reload the policies; publish new routes, or keep the old ones and
    log every problem. Without a policy path, SIGHUP is acknowledged and ignored (it
    must never end the agent: ``systemctl reload`` sends it). A cancel point."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            if not config.policies:
                log.info(
                    "SIGHUP: nothing to reload",
                    detail="no policies path; policies from [central] arrive by themselves; "
                    "restart the agent to apply other agent.toml changes",
                )
                continue
            try:
                compiled = await trio.to_thread.run_sync(load_policies, config)
            except PolicyError as exc:
                for problem in exc.problems:
                    log.error("policy problem", problem=problem)
                log.error("reload refused; the policies in force stay", path=config.policies)
                continue
            snapshot = compiled.apply(watch.current)
            watch.publish(snapshot)
            watched.update(discovered_services(snapshot, static))
            log.info("policies reloaded", path=config.policies, version=snapshot.version)
