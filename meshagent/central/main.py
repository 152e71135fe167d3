"""``meshagent central``: the central agent process, read top to bottom.

Startup order (each step bounded, each failure one line):

1. ``prepare_data_dir`` (in a worker thread): the data directory (0700), the seal key
   (32 random bytes, 0600, made at first start), the central CA and server certificate.
2. Open the store (SQLite file in the data directory, or Consul KV).
3. ``ensure_admin_token``: the global admin token in ``<data_dir>/admin.token``.
4. One root nursery: ``watch_signals`` and ``serve_api`` (hypercorn over TLS); the
   started value is the bound URL.
5. Leadership (``run_leadership``): with a Consul store, the leader election on
   ``<prefix>leader`` (its own Consul client, so long polls of agents cannot starve its
   renewals); with SQLite, this process is the only one on its file and always leads.
   ``run_leader_jobs`` runs the jobs that must run once (``central/jobs.py``) while this
   process leads. Then one line says where the admin token and the CA certificate are.

Every replica serves the whole API, leader or not: the store keeps the shared state.

SIGTERM or SIGINT: the leader jobs stop and the election gives the leader key up (so
another replica takes over at once), hypercorn stops accepting, lets requests in flight
finish within ``GRACEFUL_SECONDS`` and returns; the store is closed; exit 0.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Final, cast

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from meshagent import systemd
from meshagent.central.api import CentralState, create_app
from meshagent.central.auth import ADMIN_TOKEN_FILE, ensure_admin_token
from meshagent.central.election import run_election
from meshagent.central.jobs import Leadership, SoleLeader, leader_jobs, run_leader_jobs
from meshagent.central.store import ConsulKvStore, SqliteStore, Store
from meshagent.central.tls import CentralTls, ensure_central_tls
from meshagent.config.central import CentralConfig, split_listen
from meshagent.config.load import ConfigError
from meshagent.discovery.consul import ConsulClient, ConsulError
from meshagent.log import get_logger
from meshagent.pki.files import write_private_file
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes
from meshagent.snapshot.wire import MAX_WAIT_SECONDS

log = get_logger("central")

GRACEFUL_SECONDS: Final = 5.0
# hypercorn closes a connection that sends nothing for this long, even while its
# request is being answered: it must outlast the longest config long poll.
READ_TIMEOUT_SECONDS: Final = int(MAX_WAIT_SECONDS) + 30


@dataclass(frozen=True, slots=True)
class Prepared:
    """The data directory's contents the process runs with."""

    seal_key: bytes
    tls: CentralTls
    admin_token_path: Path


def prepare_data_dir(config: CentralConfig, *, now: datetime) -> Prepared:
    """Create (first start) or check the data directory, seal key and TLS files. Blocking.

    Raises:
        ConfigError: a file or directory cannot be created or read (one line).
        PkiError, SecretError, CentralTlsError: unusable key or certificate files.
    """
    data_dir = config.data_path
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data_dir {data_dir}: cannot create it: {exc.strerror or exc}") from None
    key_path = config.seal_key_path
    try:
        key_bytes = key_path.read_bytes()
    except FileNotFoundError:
        key_bytes = new_key_file_bytes()
        write_private_file(key_path, key_bytes)
        log.info("seal key created", path=str(key_path))
    except OSError as exc:
        raise ConfigError(f"seal_key_file {key_path}: {exc.strerror or exc}") from None
    host, _ = split_listen(config.listen)
    tls = ensure_central_tls(data_dir, host, now=now, server_names=config.server_names)
    return Prepared(key_from_file_bytes(key_bytes), tls, data_dir / ADMIN_TOKEN_FILE)


@asynccontextmanager
async def open_store(config: CentralConfig) -> AsyncIterator[Store]:
    """The store ``config`` names, closed on exit. Cancel point.

    Raises:
        StoreUnavailable: it cannot be opened. ConfigError: an unreadable token_file.
    """
    if config.store.kind == "sqlite":
        async with await SqliteStore.open(config.store_path) as sqlite:
            yield sqlite
        return
    token = await read_consul_token(config)
    async with (
        ConsulClient(config.store.address, token=token) as consul,
        ConsulKvStore(consul, config.store.prefix) as kv,
    ):
        yield kv


async def read_consul_token(config: CentralConfig) -> str | None:
    """The ACL token of ``[store] token_file`` (None without one). Cancel point.

    Raises:
        ConfigError: the file cannot be read.
    """
    if not config.store.token_file:
        return None
    try:
        token_path = Path(config.store.token_file)
        return (await trio.to_thread.run_sync(token_path.read_text)).strip()
    except OSError as exc:
        raise ConfigError(
            f"store.token_file {config.store.token_file}: {exc.strerror or exc}"
        ) from None


def leader_key(config: CentralConfig) -> str:
    """The Consul key the leader of the replicas on ``config``'s store holds."""
    return f"{config.store.prefix}leader"


async def run_leadership(
    config: CentralConfig,
    node_name: str,
    *,
    task_status: trio.TaskStatus[Leadership] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Take part in choosing the leader until cancelled; ``started`` with the Leadership.

    SQLite: this process is alone on its file, so it leads (``SoleLeader``). Consul: a
    ``LeaderElection`` on ``leader_key(config)``, with its own Consul client. Cancel
    point; never returns.

    Raises:
        ConfigError: before ``started``, Consul refused the session (ACL, or a
            session_ttl outside what it accepts), or the token file is unreadable.
    """
    if config.store.kind == "sqlite":
        task_status.started(SoleLeader())
        await trio.sleep_forever()
    token = await read_consul_token(config)
    async with ConsulClient(config.store.address, token=token) as consul:
        try:
            await run_election(
                consul,
                leader_key(config),
                node_name,
                ttl_seconds=float(config.store.session_ttl),
                lock_delay_seconds=float(config.store.lock_delay),
                task_status=task_status,
            )
        except ConsulError as exc:  # only before started: later ones are retried
            raise ConfigError(f"store: the leader election cannot start: {exc}") from None


def hypercorn_config(config: CentralConfig, tls: CentralTls) -> HypercornConfig:
    """The HTTP server's settings: TLS only, bounded reads, quiet access log."""
    server = HypercornConfig()
    server.bind = [config.listen]
    server.certfile = str(tls.server_cert)
    server.keyfile = str(tls.server_key)
    server.alpn_protocols = ["http/1.1"]
    server.accesslog = None
    server.include_server_header = False
    server.graceful_timeout = GRACEFUL_SECONDS
    server.read_timeout = READ_TIMEOUT_SECONDS
    server.ssl_handshake_timeout = 10
    return server


async def watch_signals(stop: trio.Event) -> None:
    """Set ``stop`` on the first SIGTERM or SIGINT."""
    import signal

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping", signal=signal.Signals(signum).name)
            stop.set()
            return


async def run_central(
    config: CentralConfig,
    *,
    say: Callable[[str], None] = print,
    handle_signals: bool = True,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the central agent until a signal (or ``stop``); ``started(url)`` when serving.

    Args:
        config: the checked central.toml.
        say: where the one startup line goes (stdout).
        handle_signals: watch SIGTERM/SIGINT (main thread only; tests pass False).
        stop: set it to stop the process as a signal would.

    Raises:
        ConfigError, StoreUnavailable, PkiError, SecretError, CentralTlsError, OSError
        (the listen address cannot be bound): all before ``started``.
    """
    stop = trio.Event() if stop is None else stop
    prepared = await trio.to_thread.run_sync(
        lambda: prepare_data_dir(config, now=datetime.now(UTC))
    )
    async with open_store(config) as store:
        await ensure_admin_token(store, prepared.admin_token_path, now=time.time())
        state = CentralState(
            store=store,
            seal_key=prepared.seal_key,
            join_token_ttl_seconds=float(config.join_token_ttl),
            cert_ttl_seconds=float(config.cert_ttl),
            heartbeat_seconds=float(config.heartbeat_interval),
            rotation_spread_seconds=float(config.ca_rotation_spread),
        )
        # Starlette is an ASGI app; hypercorn's Framework type is stricter than Starlette's.
        app = cast("ASGIFramework", create_app(state))
        server_config = hypercorn_config(config, prepared.tls)
        signal_scope = trio.CancelScope()

        async def watch() -> None:
            with signal_scope:
                await watch_signals(stop)

        jobs = leader_jobs(
            store,
            audit_retention_seconds=float(config.audit_retention),
            heartbeat_seconds=float(config.heartbeat_interval),
            ca_switch_timeout_seconds=float(config.ca_rotation_switch_timeout),
        )
        leader_scope = trio.CancelScope()

        async def lead(node_name: str, *, task_status: trio.TaskStatus[None]) -> None:
            with leader_scope:
                async with trio.open_nursery() as leading:
                    leadership = await leading.start(run_leadership, config, node_name)
                    await leading.start(
                        partial(
                            run_leader_jobs,
                            leadership,
                            jobs,
                            interval_seconds=float(config.leader_jobs_interval),
                        )
                    )
                    task_status.started()

        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(watch)
            nursery.start_soon(systemd.watchdog, stop)
            binds: list[str] = await nursery.start(
                partial(serve, app, server_config, shutdown_trigger=stop.wait)
            )
            url = binds[0] if binds else f"https://{config.listen}"
            await nursery.start(partial(lead, f"{socket.gethostname()} {url}"))
            say(
                f"meshagent central: serving {url}; admin token in "
                f"{prepared.admin_token_path}, CA certificate in {prepared.tls.ca_cert}"
            )
            log.info("serving", url=url, pid=os.getpid())
            systemd.notify("READY=1")
            task_status.started(url)
            await stop.wait()
            systemd.notify("STOPPING=1")
            signal_scope.cancel()
            leader_scope.cancel()  # the election gives the key up (shielded, at most 2 s)
            # hypercorn drains requests in flight for GRACEFUL_SECONDS; bound it anyway.
            nursery.cancel_scope.deadline = trio.current_time() + GRACEFUL_SECONDS + 2
        log.info("stopped")
