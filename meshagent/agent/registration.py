"""Keep every inbound registered in Consul, with a TTL check fed by the app's health probes.

Theory of operation:
* One task per inbound: probe the app, push the result into the service's TTL check
  every ``health.interval``. The TTL is three intervals, so Consul marks the instance
  critical if the agent stops reporting (hung or dead) for that long.
* A new check starts critical: peers choose the instance only after a probe passed.
* Consul forgetting the check (``update_ttl`` → False: it restarted and lost its local
  state) triggers an immediate re-registration.
* Consul unreachable or refusing: one warning per outage (and one line when it is back),
  retries with capped, jittered exponential backoff. Nothing raises out: the control
  path must never take the data path down.
* On the way out (cancellation or otherwise) every inbound is deregistered, shielded
  and bounded to 2 s, so peers stop choosing this host before it stops accepting.
"""

from __future__ import annotations

import math
from typing import Final

import trio

import meshagent
from meshagent.agent.probes import ProbeResult, probe_app_safely
from meshagent.config.agent import AgentConfig, ConsulSettings, InboundSettings
from meshagent.discovery.consul import (
    Backoff,
    CheckDefinition,
    CheckStatus,
    ConsulClient,
    ConsulProblem,
    ServiceRegistration,
)
from meshagent.log import get_logger

log = get_logger("registration")

_DEREGISTER_SECONDS: Final = 2.0


def service_id(config: AgentConfig, inbound: InboundSettings) -> str:
    """The Consul service ID of ``inbound`` on this node: ``meshagent-<node>-<service>-<port>``."""
    return f"meshagent-{config.node}-{inbound.service}-{inbound.port}"


def check_id(config: AgentConfig, inbound: InboundSettings) -> str:
    """The ID of the inbound's TTL check: ``<service id>:health``."""
    return f"{service_id(config, inbound)}:health"


def build_registration(config: AgentConfig, inbound: InboundSettings) -> ServiceRegistration:
    """What the agent registers for ``inbound``. Pure."""
    sid = service_id(config, inbound)
    consul = config.consul if config.consul is not None else ConsulSettings()
    return ServiceRegistration(
        id=sid,
        name=inbound.service,
        address=config.address,
        port=inbound.port,
        tags=tuple(f"{key}={value}" for key, value in sorted(inbound.tags.items())),
        meta={
            "mesh": config.mesh,
            "service": inbound.service,
            "version": inbound.tags.get("version", ""),
            "protocol": inbound.protocol,
            "node": config.node,
            "meshagent_version": meshagent.__version__,
        },
        check=CheckDefinition(
            check_id=check_id(config, inbound),
            name=f"{inbound.service} health",
            ttl=go_duration(3 * float(inbound.health.interval)),
            deregister_critical_service_after=go_duration(float(consul.deregister_critical_after)),
            notes="TTL check fed by meshagent's health probes of the local app",
            status="critical",
        ),
    )


def go_duration(seconds: float) -> str:
    """Seconds as a Consul (Go) duration string: 30 → "30s", 0.75 → "750ms". Pure."""
    millis = max(1, math.ceil(seconds * 1000))
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


async def keep_registered(
    consul: ConsulClient,
    config: AgentConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Register every inbound and keep its TTL check current until cancelled.

    Runs forever; never raises for Consul or app trouble. Cancel point. Deregisters
    every inbound on the way out (shielded, at most 2 s).

    Args:
        consul: the Consul adapter (not closed here).
        config: the agent config; one registration per ``config.inbound``.
        task_status: ``started()`` once every inbound had its first registration
            attempt, successful or not, so the agent starts while Consul is down.
    """
    try:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as starting:
                for inbound in config.inbound:
                    starting.start_soon(nursery.start, _keep_inbound, consul, config, inbound)
            task_status.started()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(_DEREGISTER_SECONDS) as scope:
            async with trio.open_nursery() as nursery:
                for inbound in config.inbound:
                    nursery.start_soon(_deregister, consul, config, inbound)
        if scope.cancelled_caught:
            log.warning(
                "deregistration unfinished",
                consul=consul.address,
                timeout=_DEREGISTER_SECONDS,
            )


async def _deregister(consul: ConsulClient, config: AgentConfig, inbound: InboundSettings) -> None:
    sid = service_id(config, inbound)
    try:
        await consul.deregister_service(sid)
    except ConsulProblem as exc:
        log.warning("deregistration failed", service=inbound.service, id=sid, error=str(exc))
    else:
        log.info("deregistered", service=inbound.service, id=sid)


class _Outage:
    """Logs a Consul problem once per outage (or when it changes kind) and the recovery."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._problem: type[ConsulProblem] | None = None

    def failed(self, exc: ConsulProblem, retry_in: float) -> None:
        if type(exc) is not self._problem:
            log.warning(
                "consul problem",
                service=self._service,
                error=str(exc),
                retry_in=round(retry_in, 2),
            )
            self._problem = type(exc)

    def succeeded(self) -> None:
        if self._problem is not None:
            log.info("consul reachable again", service=self._service)
            self._problem = None


async def _keep_inbound(
    consul: ConsulClient,
    config: AgentConfig,
    inbound: InboundSettings,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The loop of one inbound: register, then probe and report every interval."""
    registration = build_registration(config, inbound)
    cid = check_id(config, inbound)
    interval = float(inbound.health.interval)
    backoff = Backoff()
    outage = _Outage(inbound.service)
    registered = False
    started = False
    was_healthy: bool | None = None
    while True:
        next_tick = trio.current_time() + interval
        try:
            just_registered = False
            if not registered:
                try:
                    await consul.register_service(registration)
                except ConsulProblem:
                    if not started:  # a failed first attempt still lets the agent start
                        started = True
                        task_status.started()
                    raise
                if not started:
                    started = True
                    task_status.started()
                registered = just_registered = True
                log.info("registered", service=inbound.service, id=registration.id)
            result = await probe_app_safely(inbound)
            if result.healthy is not was_healthy:
                report = log.info if result.healthy else log.warning
                event = "app healthy" if result.healthy else "app unhealthy"
                report(event, service=inbound.service, output=result.output)
                was_healthy = result.healthy
            if not await consul.update_ttl(cid, _status(result), result.output):
                registered = False
                if just_registered:
                    raise _CheckVanished(
                        f"consul at {consul.address} lost check {cid} right after registering"
                    )
                log.warning("check unknown to consul; registering again", id=registration.id)
                continue
        except ConsulProblem as exc:
            delay = backoff.next_delay()
            outage.failed(exc, delay)
            await trio.sleep(delay)
            continue
        outage.succeeded()
        backoff.reset()
        await trio.sleep_until(next_tick)


class _CheckVanished(ConsulProblem):
    """Consul forgot a check we registered a moment ago; back off and try again."""


def _status(result: ProbeResult) -> CheckStatus:
    return "passing" if result.healthy else "critical"


__all__ = ["build_registration", "check_id", "go_duration", "keep_registered", "service_id"]
