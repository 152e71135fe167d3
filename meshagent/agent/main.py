"""run_agent: the agent process, top to bottom.

Startup is a readiness chain (each step returns once it is ready)::

    follow_consul       first answer (or first failure) for every upstream service
    keep_app_health     first probe of every inbound ([central] without [consul])
    serve_dataplane     every listener bound            (a bind failure is fatal)
    keep_registered     first registration attempt of every inbound
    persist_snapshots   (when state_dir is set)
    -> READY=1

Shutdown, on SIGTERM or SIGINT (a second one forces it)::

    STOPPING=1 -> deregister from Consul (peers stop choosing us) -> stop accepting
    -> in-flight connections get limits.drain_timeout to finish -> exit 0
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path

import trio

from meshagent import __version__
from meshagent.agent import systemd
from meshagent.agent.admin import AdminState, serve_admin
from meshagent.agent.catalog import follow_consul
from meshagent.agent.central import (
    Joined,
    Status,
    apply_config,
    ensure_joined,
    follow_config,
    keep_certificates_fresh,
    load_config,
    report_status,
    update_trust_bundle,
)
from meshagent.agent.central_client import CentralClient, central_tls_context
from meshagent.agent.certs import not_after_of, warn_before_expiry
from meshagent.agent.health import keep_app_health
from meshagent.agent.metrics import AgentCollector, new_registry
from meshagent.agent.policies import (
    WatchedServices,
    discovered_services,
    load_policies,
    reload_on_sighup,
)
from meshagent.agent.registration import keep_registered
from meshagent.agent.state import load_cached_endpoints, persist_snapshots
from meshagent.agent.watch import SnapshotWatch
from meshagent.agent.workers import LogSetup, Workers, default_worker_count
from meshagent.config.agent import AgentConfig, initial_snapshot
from meshagent.config.load import ConfigError
from meshagent.dataplane.errors import BindError
from meshagent.dataplane.serve import DataplaneHandle, serve_dataplane
from meshagent.dataplane.tls import IdentityFiles, TlsContexts
from meshagent.discovery.consul import ConsulClient
from meshagent.log import get_logger
from meshagent.pki.files import PkiError
from meshagent.policy.load import PolicyError
from meshagent.snapshot.model import Endpoint
from meshagent.snapshot.wire import DataplaneConfig

log = get_logger("agent")


def identities_of(config: AgentConfig) -> dict[str, IdentityFiles]:
    """Every identity this host presents: one per inbound service and outbound source."""
    identities: dict[str, IdentityFiles] = {}
    for name in config.identities():
        files = config.identity_files(name)
        if files is not None:
            identities[name] = IdentityFiles(ca=files.ca, cert=files.cert, key=files.key)
    return identities


def _log_setup(config: AgentConfig) -> LogSetup:
    """What a worker process needs to log like the agent (it opens the access log itself)."""
    return LogSetup(
        level=config.log.level,
        fmt=config.log.format,
        access=config.log.access,
        context={"mesh": config.mesh, "node": config.node},
    )


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise ConfigError(f"consul.token_file: cannot read {path}: {exc.strerror}") from None


async def _watch_signals(shutdown: trio.Event, force: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if shutdown.is_set():
                log.warning("second signal: stopping now", signal=signal.Signals(signum).name)
                force.cancel()
                return
            log.info("stopping", signal=signal.Signals(signum).name)
            shutdown.set()


async def run_agent(
    config: AgentConfig,
    *,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[DataplaneHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until ``shutdown`` is set or a signal arrives. A cancel point.

    Raises:
        ConfigError: unreadable TLS material or Consul token (before anything is bound).
        JoinError: [central] refused the join, or stayed unreachable (before binding).
        BindError: a listener could not bind.
    """
    if config.central is None:
        await _run(config, None, shutdown, task_status)
        return
    try:
        tls_context = central_tls_context(config.central.ca)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    async with CentralClient(config.central.url, tls_context) as client:
        joined = await ensure_joined(config, client)
        await _run(config, (client, joined), shutdown, task_status)


async def _run(
    config: AgentConfig,
    central: tuple[CentralClient, Joined] | None,
    shutdown: trio.Event | None,
    task_status: trio.TaskStatus[DataplaneHandle],
) -> None:
    shutdown = shutdown or trio.Event()
    identities = identities_of(config)
    count = config.worker_count(default_worker_count())
    # Worker processes share the key of TLS tickets, so a session resumes in any of them.
    ticket_secret = os.urandom(32) if count > 1 else None
    try:
        tls = TlsContexts(identities, ticket_secret=ticket_secret)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls: cannot load certificates: {exc}") from None
    token = read_token(config.consul.token_file) if config.consul else None
    try:
        policies = load_policies(config)
    except PolicyError as exc:
        raise ConfigError(exc.summary()) from None
    snapshot = policies.apply(initial_snapshot(config))
    static = sorted(snapshot.endpoints)
    state_dir = Path(config.state_dir) if config.state_dir else None
    if state_dir is not None:
        snapshot = load_cached_endpoints(state_dir, snapshot)
    saved = None
    if central is not None:
        saved = await trio.to_thread.run_sync(load_config, central[1])
        if saved is not None:
            snapshot = apply_config(
                snapshot, saved, static=frozenset(static), catalog=config.consul is None
            )
    watch = SnapshotWatch(snapshot)
    cert_paths = {name: f.cert for name, f in identities.items()}
    cert_expiry = not_after_of(cert_paths)

    workers = (
        Workers(count, identities, _log_setup(config), ticket_secret=ticket_secret)
        if count > 1
        else None
    )

    def swap_certificates() -> None:
        """Rebuild the TLS contexts from the files (blocking; after a renewal)."""
        tls.swap(identities)
        cert_expiry.update(not_after_of(cert_paths))
        if workers is not None:
            workers.certificates_changed()

    admin = AdminState(
        new_registry(
            AgentCollector(
                lambda: admin.by_listener(),
                lambda: admin.http(),
                lambda: watch.current,
                cert_expiry,
                workers.processes if workers is not None else lambda: (1, 0),
            )
        ),
        workers,
    )

    def publish(service: str, endpoints: tuple[Endpoint, ...]) -> None:
        watch.publish(watch.current.with_endpoints(service, endpoints))
        log.info("endpoints changed", service=service, count=len(endpoints))

    watched = WatchedServices(discovered_services(snapshot, static))

    async def apply_central(dataplane_config: DataplaneConfig) -> str:
        assert central is not None
        try:
            await update_trust_bundle(central[1], dataplane_config.ca_bundle, swap_certificates)
        except (PkiError, OSError, ValueError) as exc:
            return f"cannot use the trust bundle: {exc}"
        updated = apply_config(
            watch.current,
            dataplane_config,
            static=frozenset(static),
            catalog=config.consul is None,
        )
        watch.publish(updated)
        watched.update(discovered_services(updated, static))
        return ""

    consul = (
        ConsulClient(config.consul.address, token=token) if config.consul is not None else None
    )
    log.info(
        "starting",
        version=__version__,
        inbounds=len(snapshot.inbounds),
        outbounds=len(snapshot.outbounds),
    )
    try:
        async with trio.open_nursery() as root:
            auxiliary: trio.CancelScope = await root.start(
                _run_auxiliary, shutdown, root.cancel_scope, config.admin, admin
            )
            async with trio.open_nursery() as control:
                if central is not None:
                    client, joined = central
                    status = Status(applied_version=saved.version if saved else 0)
                    await control.start(
                        partial(
                            follow_config,
                            client,
                            joined,
                            apply_central,
                            status,
                            after=saved.version if saved else 0,
                        )
                    )
                    await control.start(
                        keep_certificates_fresh, client, joined, swap_certificates, status
                    )
                    if consul is None and config.inbound:  # the built-in catalog's health
                        await control.start(keep_app_health, config.inbound, status)
                    await control.start(report_status, client, joined, status)
                if consul is not None:
                    wait = float(config.consul.watch_wait) if config.consul else 30.0
                    await control.start(
                        _follow_catalog, consul, config.mesh, watched, publish, wait
                    )
                # Always: a SIGHUP (systemctl reload) must never end the agent.
                await control.start(reload_on_sighup, config, watch, watched, static)
                dataplane: DataplaneHandle = await root.start(
                    partial(
                        _serve_dataplane_then_stop,
                        watch,
                        tls,
                        auxiliary,
                        reuse_port=workers is not None,
                    )
                )
                if workers is not None:
                    await root.start(workers.run, watch)
                admin.dataplane = dataplane.context
                if consul is not None and config.inbound:
                    await control.start(keep_registered, consul, config)
                if state_dir is not None:
                    await control.start(persist_snapshots, watch, state_dir)
                if central is None:  # certificates from [central] renew themselves
                    await control.start(warn_before_expiry, cert_paths)
                systemd.notify("READY=1")
                log.info("ready")
                task_status.started(dataplane)
                await shutdown.wait()
                systemd.notify("STOPPING=1")
                control.cancel_scope.cancel()  # keep_registered deregisters on its way out
            dataplane.drain(float(config.limits.drain_timeout))
            if workers is not None:
                workers.drain(float(config.limits.drain_timeout))
            active = dataplane.context.counters.active
            log.info("draining", active=active, timeout=float(config.limits.drain_timeout))
    finally:
        if consul is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await consul.aclose()
    log.info("stopped")


async def _follow_catalog(
    consul: ConsulClient,
    mesh: str,
    watched: WatchedServices,
    publish: Callable[[str, tuple[Endpoint, ...]], None],
    wait_seconds: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """follow_consul over ``watched.services``, restarted when a reload changes the set."""
    status: trio.TaskStatus[None] = task_status
    while True:
        changed = watched.changed
        async with trio.open_nursery() as nursery:
            if watched.services:
                await nursery.start(
                    functools.partial(
                        follow_consul,
                        consul,
                        mesh=mesh,
                        services=watched.services,
                        publish=publish,
                        wait_seconds=wait_seconds,
                    )
                )
            status.started()
            status = trio.TASK_STATUS_IGNORED
            await changed.wait()
            log.info("catalog services changed", services=",".join(watched.services))
            nursery.cancel_scope.cancel()


async def _run_auxiliary(
    shutdown: trio.Event,
    force: trio.CancelScope,
    admin_address: str,
    admin: AdminState,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The tasks that live as long as the data path: the signal watcher, systemd's
    watchdog pings and the admin endpoint. ``started(scope)``: cancelling it ends them
    once the data path drained."""
    async with trio.open_nursery() as auxiliary:
        auxiliary.start_soon(_watch_signals, shutdown, force)
        auxiliary.start_soon(systemd.watchdog)
        if admin_address:
            try:
                await auxiliary.start(serve_admin, admin_address, admin)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise BindError(f"admin: cannot listen on {admin_address}: {reason}") from None
        task_status.started(auxiliary.cancel_scope)


async def _serve_dataplane_then_stop(
    watch: SnapshotWatch,
    tls: TlsContexts,
    auxiliary: trio.CancelScope,
    *,
    reuse_port: bool,
    task_status: trio.TaskStatus[DataplaneHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """serve_dataplane, then end the auxiliary tasks: once drained, nothing is left to
    guard or report."""
    try:
        await serve_dataplane(watch, tls, reuse_port=reuse_port, task_status=task_status)
    finally:
        auxiliary.cancel()
