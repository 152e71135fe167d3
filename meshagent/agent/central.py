"""An agent joined to a central agent: its credentials on disk, the join, the config
follower, the status reporter and certificate renewal.

Theory of operation:

* ``<state_dir>/central/`` holds what the join gave this host, so a restart (even while
  the central agent is down) serves at once: ``node.token`` (the node credential,
  0600), ``ca.pem`` (the mesh trust bundle), ``<service>.pem`` (certificate and key in
  one 0600 file, replaced atomically so a reader never sees a new certificate with an
  old key), ``config.json`` (the last config applied, 0600), and ``joined.json``
  (written last: the marker that the rest is complete).
* Joining (``ensure_joined``) happens once: the key of every identity is made here and
  only its CSR leaves the host. An unreachable central agent is retried until
  ``join_timeout``; a refusal (bad token, a service the token does not allow) stops at
  once with the central agent's one-line reason.
* ``follow_config`` long-polls the config; each new version is applied whole or
  rejected whole (the reason goes back in the status report), and persisted.
* ``keep_certificates_fresh`` renews every certificate at two thirds of its life with
  new keys, then swaps the TLS contexts: open connections keep the context they
  started with, so a renewal drops nothing. During a CA rotation (the config names a
  signing CA that did not issue some of this host's certificates) it renews at once,
  after a random delay within the config's ``rotation_spread_seconds``.
* Every call to the central agent has a deadline; failures back off (1 s doubling to
  30 s) and the data path keeps serving with what it has.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import msgspec
import trio

from meshagent.agent.central_client import CentralClient, CentralRefused, CentralUnavailable
from meshagent.config.agent import AgentConfig
from meshagent.config.load import ConfigError
from meshagent.log import get_logger
from meshagent.pki.csr import CsrRejected, check_issued, make_csr, renew_at
from meshagent.pki.files import PkiError, write_private_file, write_public_file
from meshagent.pki.rotation import issuer_fingerprint, needs_rotation, rotation_delay, short
from meshagent.snapshot.model import Endpoint, Snapshot
from meshagent.snapshot.wire import (
    DataplaneConfig,
    DataplaneUpdate,
    InboundSpec,
    JoinRequest,
    OutboundSpec,
    RenewRequest,
    StatusReport,
)

log = get_logger("central")

# The heartbeat until a config names one (DataplaneConfig.heartbeat_seconds), and the
# bounds put on what a config names.
HEARTBEAT_SECONDS: Final = 10.0
MIN_HEARTBEAT_SECONDS: Final = 1.0
MAX_HEARTBEAT_SECONDS: Final = 300.0
LONG_POLL_SECONDS: Final = 30.0
# Reports that a change triggers (a health state, a config applied) are at least this
# far apart: a flapping app costs the central agent one write per second at most.
MIN_REPORT_SECONDS: Final = 1.0
MAX_BACKOFF_SECONDS: Final = 30.0
JOINED_FILE = "joined.json"
TOKEN_FILE = "node.token"
CA_FILE = "ca.pem"
CONFIG_FILE = "config.json"


class JoinError(Exception):
    """The agent cannot join (or has not joined) its mesh; one line with the fix."""


class _Marker(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    mesh: str
    dataplane: str
    identities: list[str]
    # The listeners the central agent knows; None in files of an older agent.
    registration: DataplaneUpdate | None = None


@dataclass
class SigningCa:
    """The mesh's signing CA as the latest config applied names it ("": not said), and
    the spread of rotation renewals. ``changed`` is set (and replaced) whenever a config
    changes either, or the trust bundle: the renewer then looks again."""

    fingerprint: str = ""
    spread_seconds: float = 120.0
    bundle: str = ""
    changed: trio.Event = field(default_factory=trio.Event)

    def update(self, config: DataplaneConfig) -> None:
        spread = config.rotation_spread_seconds
        seen = (self.fingerprint, self.spread_seconds, self.bundle)
        self.fingerprint = config.signing_ca
        self.spread_seconds = spread if math.isfinite(spread) and spread >= 0 else 120.0
        self.bundle = config.ca_bundle
        if (self.fingerprint, self.spread_seconds, self.bundle) != seen:
            self.changed.set()
            self.changed = trio.Event()


@dataclass
class Joined:
    """This host's membership of a mesh, as on disk."""

    directory: Path
    url: str
    mesh: str
    dataplane: str
    identities: list[str]
    node_token: str = field(repr=False)
    ca_bundle: str
    # The listeners the central agent knows, and the ones agent.toml now has when they
    # differ (sent by ``follow_config`` before its first fetch).
    registration: DataplaneUpdate | None = None
    pending: DataplaneUpdate | None = None
    signing: SigningCa = field(default_factory=SigningCa)

    def marker(self) -> _Marker:
        return _Marker(
            url=self.url,
            mesh=self.mesh,
            dataplane=self.dataplane,
            identities=self.identities,
            registration=self.registration,
        )

    def pem_path(self, service: str) -> Path:
        return self.directory / f"{service}.pem"


# ---------------------------------------------------------------------------- on disk


def load_joined(config: AgentConfig) -> Joined | None:
    """The membership on disk, if it is complete and matches ``config`` (the central
    agent it joined through is among ``central.url``; same mesh, name and identities);
    None means: join. Blocking."""
    assert config.central is not None
    directory = config.central_dir
    try:
        marker = msgspec.json.decode((directory / JOINED_FILE).read_bytes(), type=_Marker)
        token = (directory / TOKEN_FILE).read_text().strip()
        ca_bundle = (directory / CA_FILE).read_text()
        for service in marker.identities:
            (directory / f"{service}.pem").stat()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, msgspec.DecodeError) as exc:
        log.warning("ignoring the saved membership", path=str(directory), error=str(exc))
        return None
    urls = config.central.urls
    wanted = _Marker(
        # Replicas share one store: adding or removing one keeps the membership.
        url=marker.url if marker.url in urls else urls[0],
        mesh=config.mesh,
        dataplane=config.dataplane_name,
        identities=config.identities(),
        registration=marker.registration,
    )
    if marker != wanted:
        log.warning(
            "agent.toml changed since this host joined (central url, mesh, dataplane name "
            "or services); joining again",
            path=str(directory),
        )
        return None
    current = registration(config)
    return Joined(
        directory=directory,
        url=marker.url,
        mesh=marker.mesh,
        dataplane=marker.dataplane,
        identities=marker.identities,
        node_token=token,
        ca_bundle=ca_bundle,
        registration=marker.registration,
        pending=None if marker.registration == current else current,
    )


def _write_identity(joined: Joined, service: str, cert_pem: str, key_pem: bytes) -> None:
    write_private_file(joined.pem_path(service), cert_pem.encode() + key_pem)


def _write_marker(joined: Joined) -> None:
    write_private_file(joined.directory / JOINED_FILE, msgspec.json.encode(joined.marker()))


def _write_ca(joined: Joined) -> None:
    write_public_file(joined.directory / CA_FILE, joined.ca_bundle.encode())


def save_config(joined: Joined, config: DataplaneConfig) -> None:
    """Persist the config in force (blocking; raises PkiError)."""
    write_private_file(joined.directory / CONFIG_FILE, msgspec.json.encode(config))


def load_config(joined: Joined) -> DataplaneConfig | None:
    """The last config applied, or None (missing or unreadable: logged). Blocking."""
    path = joined.directory / CONFIG_FILE
    try:
        config = msgspec.json.decode(path.read_bytes(), type=DataplaneConfig)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        log.warning("ignoring the saved config", path=str(path), error=str(exc))
        return None
    return config if config.mesh == joined.mesh else None


def certificate_window(joined: Joined) -> tuple[datetime, datetime]:
    """(not_before, not_after) of the certificate that expires first. Blocking."""
    from cryptography import x509

    windows = []
    for service in joined.identities:
        cert = x509.load_pem_x509_certificate(joined.pem_path(service).read_bytes())
        windows.append((cert.not_valid_after_utc, cert.not_valid_before_utc))
    not_after, not_before = min(windows)
    return not_before, not_after


def certificate_issuers(joined: Joined) -> list[str]:
    """The fingerprints of the CAs (of the trust bundle) that issued this host's
    certificates, sorted, without repeats; "" for a certificate no CA of the bundle
    issued. Blocking."""
    from cryptography import x509

    try:
        cas = x509.load_pem_x509_certificates(joined.ca_bundle.encode())
    except ValueError:
        cas = []
    issuers = set()
    for service in joined.identities:
        cert = x509.load_pem_x509_certificate(joined.pem_path(service).read_bytes())
        issuers.add(issuer_fingerprint(cert, cas))
    return sorted(issuers)


# ---------------------------------------------------------------------------- joining


def registration(config: AgentConfig) -> DataplaneUpdate:
    """The listeners of agent.toml as the central agent knows them."""
    return DataplaneUpdate(
        node=config.node,
        address=config.address,
        inbounds=[
            InboundSpec(service=i.service, port=i.port, protocol=i.protocol, tags=i.tags)
            for i in config.inbound
        ],
        outbounds=[
            OutboundSpec(
                service=o.service,
                port=o.port,
                protocol=o.protocol,
                source=config.outbound_source(o),
            )
            for o in config.outbound
        ],
    )


def join_request(config: AgentConfig, csrs: Mapping[str, bytes]) -> JoinRequest:
    listeners = registration(config)
    return JoinRequest(
        mesh=config.mesh,
        dataplane=config.dataplane_name,
        node=listeners.node,
        address=listeners.address,
        inbounds=listeners.inbounds,
        outbounds=listeners.outbounds,
        csrs={service: pem.decode() for service, pem in csrs.items()},
    )


def _read_join_token(path: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"central.token_file: cannot read {path}: {exc.strerror or exc} (make a token "
            "with: meshagent token create --mesh <mesh> --service <service>)"
        ) from None
    if not token:
        raise ConfigError(f"central.token_file: {path} is empty")
    return token


def _new_keys(mesh: str, identities: list[str]) -> dict[str, tuple[bytes, bytes]]:
    return {service: make_csr(mesh, service) for service in identities}


async def ensure_joined(config: AgentConfig, client: CentralClient) -> Joined:
    """The saved membership, or a new one from a join. A cancel point.

    Raises:
        ConfigError: the join token file cannot be read.
        JoinError: the central agent refused, or stayed unreachable for join_timeout.
    """
    assert config.central is not None
    joined = await trio.to_thread.run_sync(load_joined, config)
    if joined is not None:
        log.info("using saved membership", mesh=joined.mesh, dataplane=joined.dataplane)
        return joined
    token = await trio.to_thread.run_sync(_read_join_token, config.central.token_file)
    identities = config.identities()
    keys = await trio.to_thread.run_sync(_new_keys, config.mesh, identities)
    request = join_request(config, {s: csr for s, (csr, _) in keys.items()})
    deadline = trio.current_time() + float(config.central.join_timeout)
    delay = 1.0
    while True:
        try:
            answer = await client.join(token, request)
            break
        except CentralRefused as exc:
            raise JoinError(f"join refused: {exc}") from None
        except CentralUnavailable as exc:
            if trio.current_time() + delay > deadline:
                raise JoinError(
                    f"cannot join mesh {config.mesh}: {exc} (gave up after "
                    f"{float(config.central.join_timeout):g} s; central.join_timeout)"
                ) from None
            log.warning("join failed; retrying", error=str(exc), retry_in=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
    joined = Joined(
        directory=config.central_dir,
        url=client.url,
        mesh=answer.mesh,
        dataplane=answer.dataplane,
        identities=identities,
        node_token=answer.node_token,
        ca_bundle=answer.ca_bundle,
        registration=registration(config),
    )
    await trio.to_thread.run_sync(_save_join, joined, answer.certificates, keys)
    log.info("joined", mesh=joined.mesh, dataplane=joined.dataplane, services=",".join(identities))
    return joined


def _checked(
    joined: Joined, certificates: Mapping[str, str], keys: Mapping[str, tuple[bytes, bytes]]
) -> None:
    missing = sorted(set(joined.identities) - set(certificates))
    if missing:
        raise JoinError(f"the central agent sent no certificate for {', '.join(missing)}")
    for service in joined.identities:
        try:
            check_issued(
                certificates[service].encode(),
                keys[service][1],
                joined.ca_bundle.encode(),
                mesh=joined.mesh,
                service=service,
            )
        except CsrRejected as exc:
            raise JoinError(f"unusable certificate from the central agent: {exc}") from None


def _save_join(
    joined: Joined, certificates: Mapping[str, str], keys: Mapping[str, tuple[bytes, bytes]]
) -> None:
    _checked(joined, certificates, keys)
    try:
        joined.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for service in joined.identities:
            _write_identity(joined, service, certificates[service], keys[service][1])
        _write_ca(joined)
        write_private_file(joined.directory / TOKEN_FILE, (joined.node_token + "\n").encode())
        _write_marker(joined)
    except OSError as exc:
        raise JoinError(f"{joined.directory}: cannot save the membership: {exc}") from None


# ---------------------------------------------------------------------------- applying


def apply_config(
    snapshot: Snapshot, config: DataplaneConfig, *, static: frozenset[str], catalog: bool
) -> Snapshot:
    """``snapshot`` (one version up) with the central agent's mTLS mode, routes,
    permissions and request policies; with ``catalog``, also its endpoints for every
    service without fixed endpoints in agent.toml. Pure."""
    outbounds = {o.service for o in snapshot.outbounds}
    endpoints: dict[str, tuple[Endpoint, ...]] = dict(snapshot.endpoints)
    if catalog:
        endpoints = {s: eps for s, eps in snapshot.endpoints.items() if s in static}
        endpoints.update({s: eps for s, eps in config.endpoints.items() if s not in static})
    return msgspec.structs.replace(
        snapshot,
        version=snapshot.version + 1,
        mtls=config.mtls,
        routes={s: r for s, r in config.routes.items() if s in outbounds},
        permissions=dict(config.permissions),
        default_allow=config.default_allow,
        request_policies=dict(config.request_policies),
        endpoints=endpoints,
    )


def config_problem(config: DataplaneConfig, joined: Joined) -> str:
    """Why ``config`` cannot be applied ("" if it can). Pure."""
    from cryptography import x509

    if config.mesh != joined.mesh:
        return f"config is for mesh {config.mesh!r}, this dataplane is in {joined.mesh!r}"
    if config.ca_bundle:
        try:
            x509.load_pem_x509_certificates(config.ca_bundle.encode())
        except ValueError:
            return "ca_bundle is not PEM certificates"
    return ""


# ---------------------------------------------------------------------------- status


@dataclass
class Status:
    """What the next status report says; ``changed`` wakes the reporter early."""

    applied_version: int = 0
    rejected: str = ""
    cert_not_after: float | None = None
    cert_issuers: list[str] | None = None
    # The inbound services whose health probes fail (agent/health.py); None when the
    # agent does not probe for the central agent (it follows Consul).
    unhealthy: list[str] | None = None
    heartbeat_seconds: float = HEARTBEAT_SECONDS
    changed: trio.Event = field(default_factory=trio.Event)

    def update(self, **changes: object) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        self.changed.set()

    def report(self) -> StatusReport:
        return StatusReport(
            applied_version=self.applied_version,
            state="rejected" if self.rejected else "applied",
            error=self.rejected,
            cert_not_after=self.cert_not_after,
            cert_issuers=self.cert_issuers,
            unhealthy=self.unhealthy,
        )


async def report_status(
    client: CentralClient,
    joined: Joined,
    status: Status,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send the status every ``status.heartbeat_seconds`` (what the central agent's
    configs ask for), and soon after it changes, at most once per
    ``MIN_REPORT_SECONDS``: changes meanwhile go in the next report. A cancel point."""
    task_status.started()
    failing = False
    sent = -math.inf
    while True:
        await trio.sleep_until(sent + MIN_REPORT_SECONDS)
        sent = trio.current_time()
        status.changed = trio.Event()
        try:
            await client.report(joined.node_token, joined.mesh, joined.dataplane, status.report())
            if failing:
                log.info("central agent reachable again", url=client.url)
            failing = False
        except (CentralUnavailable, CentralRefused) as exc:
            if not failing:
                log.warning("cannot report status", error=str(exc))
            failing = True
        with trio.move_on_after(status.heartbeat_seconds):
            await status.changed.wait()


# ---------------------------------------------------------------------------- config


ApplyConfig = Callable[[DataplaneConfig], Awaitable[str]]
"""Apply a config whole; return "" or why it was rejected (nothing applied)."""


async def follow_config(
    client: CentralClient,
    joined: Joined,
    apply: ApplyConfig,
    status: Status,
    *,
    after: int,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Long-poll the config; apply and persist each new version. A cancel point.

    ``after``: the version in force (0: none). With none, the first fetch is part of
    the start (bounded by the client's deadline); without an answer the agent starts
    with agent.toml's settings and keeps asking.
    """
    started = False
    saved = await trio.to_thread.run_sync(load_config, joined) if after else None
    if saved is not None and saved.version == after:
        joined.signing.update(saved)
    if after:
        task_status.started()
        started = True
    delay = 1.0
    while True:
        wait = 0.0 if not started else LONG_POLL_SECONDS
        try:
            if joined.pending is not None:
                await send_update(client, joined)
            config = await client.config(
                joined.node_token, joined.mesh, joined.dataplane, after=after, wait_seconds=wait
            )
        except (CentralUnavailable, CentralRefused) as exc:
            log.warning("cannot fetch config; keeping the one in force", error=str(exc),
                        retry_in=delay)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS)
            continue
        delay = 1.0
        if math.isfinite(config.heartbeat_seconds):
            status.heartbeat_seconds = min(
                max(config.heartbeat_seconds, MIN_HEARTBEAT_SECONDS), MAX_HEARTBEAT_SECONDS
            )
        if config.version != after:
            problem = config_problem(config, joined) or await apply(config)
            if problem:
                log.error("config rejected", version=config.version, problem=problem)
                status.update(rejected=problem)
            else:
                await _persist(joined, config)
                joined.signing.update(config)
                status.update(applied_version=config.version, rejected="")
                log.info("config applied", version=config.version, mtls=config.mtls)
            after = config.version
        if not started:
            task_status.started()
            started = True


async def send_update(client: CentralClient, joined: Joined) -> None:
    """Tell the central agent the listeners agent.toml has now, then remember them.
    Raises CentralUnavailable, CentralRefused (new identities need a new join)."""
    assert joined.pending is not None
    await client.update(joined.node_token, joined.mesh, joined.dataplane, joined.pending)
    joined.registration, joined.pending = joined.pending, None
    try:
        await trio.to_thread.run_sync(_write_marker, joined)
    except PkiError as exc:
        log.warning("cannot save the membership", error=str(exc))
    log.info("listeners updated at the central agent", dataplane=joined.dataplane)


async def _persist(joined: Joined, config: DataplaneConfig) -> None:
    try:
        await trio.to_thread.run_sync(save_config, joined, config)
    except PkiError as exc:
        log.warning("cannot save config", error=str(exc))


async def update_trust_bundle(joined: Joined, ca_bundle: str, swap: Callable[[], None]) -> None:
    """Write a changed trust bundle and rebuild the TLS contexts. Raises PkiError."""
    if not ca_bundle or ca_bundle == joined.ca_bundle:
        return
    joined.ca_bundle = ca_bundle
    await trio.to_thread.run_sync(_write_ca, joined)
    await trio.to_thread.run_sync(swap)
    log.info("trust bundle updated", mesh=joined.mesh)


# ---------------------------------------------------------------------------- renewal


async def keep_certificates_fresh(
    client: CentralClient,
    joined: Joined,
    swap: Callable[[], None],
    status: Status,
    *,
    rng: random.Random | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Renew every certificate at two thirds of the life of the first to expire, then
    ``swap`` (rebuild the TLS contexts from the files). During a CA rotation, renew
    certificates the signing CA did not issue at once, after a random delay within
    the config's spread (drawn once per signing CA). A cancel point."""
    rng = rng if rng is not None else random.Random()
    not_before, not_after = await trio.to_thread.run_sync(certificate_window, joined)
    issuers = await trio.to_thread.run_sync(certificate_issuers, joined)
    status.update(cert_not_after=not_after.timestamp(), cert_issuers=issuers)
    task_status.started()
    delay = 1.0
    rotation_for = ""  # the signing CA the rotation delay below was drawn for
    rotation_due = 0.0  # trio time
    while True:
        changed = joined.signing.changed
        signing = joined.signing.fingerprint
        due = renew_at(not_before, not_after)
        left = (due - datetime.now(UTC)).total_seconds()
        if needs_rotation(issuers, signing):
            if rotation_for != signing:
                rotation_for = signing
                wait = rotation_delay(joined.signing.spread_seconds, rng)
                rotation_due = trio.current_time() + wait
                log.info(
                    "certificates are not from the mesh's signing CA; renewing them",
                    signing_ca=short(signing),
                    in_seconds=round(wait, 1),
                )
            left = min(left, rotation_due - trio.current_time())
        if left > 0:
            # Wake at least every 5 minutes: a suspended host's monotonic clock stops.
            with trio.move_on_after(min(left, 300.0)):
                await changed.wait()
            issuers = await _issuers(joined, status, issuers)
            continue
        try:
            await renew_once(client, joined, swap)
        except (CentralUnavailable, CentralRefused, JoinError, PkiError) as exc:
            remaining = (not_after - datetime.now(UTC)).total_seconds()
            log.warning(
                "certificate renewal failed; retrying",
                error=str(exc),
                expires_in_seconds=math.floor(remaining),
                retry_in=delay,
            )
            await trio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_SECONDS, max(remaining / 10, 1.0))
            continue
        delay = 1.0
        not_before, not_after = await trio.to_thread.run_sync(certificate_window, joined)
        issuers = await trio.to_thread.run_sync(certificate_issuers, joined)
        status.update(cert_not_after=not_after.timestamp(), cert_issuers=issuers)
        if needs_rotation(issuers, signing):
            # Still not from the CA the config names (it changed meanwhile): look again
            # after at least a second, not in a tight loop.
            rotation_due = trio.current_time() + max(
                1.0, rotation_delay(joined.signing.spread_seconds, rng)
            )
        log.info(
            "certificates renewed",
            not_after=not_after.isoformat(timespec="seconds"),
            ca=",".join(short(i) for i in issuers),
        )


async def _issuers(joined: Joined, status: Status, issuers: list[str]) -> list[str]:
    """The issuers of this host's certificates again (the trust bundle may have
    changed), reported when they differ."""
    try:
        now = await trio.to_thread.run_sync(certificate_issuers, joined)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the certificates", error=str(exc))
        return issuers
    if now != issuers:
        status.update(cert_issuers=now)
    return now


async def renew_once(client: CentralClient, joined: Joined, swap: Callable[[], None]) -> None:
    """New keys, CSRs to the central agent, certificates checked, files replaced, TLS
    contexts swapped. Raises CentralUnavailable, CentralRefused, JoinError, PkiError."""
    keys = await trio.to_thread.run_sync(_new_keys, joined.mesh, joined.identities)
    answer = await client.renew(
        joined.node_token,
        joined.mesh,
        joined.dataplane,
        RenewRequest(csrs={s: csr.decode() for s, (csr, _) in keys.items()}),
    )
    bundle = answer.ca_bundle or joined.ca_bundle
    candidate = Joined(
        directory=joined.directory, url=joined.url, mesh=joined.mesh,
        dataplane=joined.dataplane, identities=joined.identities,
        node_token=joined.node_token, ca_bundle=bundle,
    )
    await trio.to_thread.run_sync(_checked, candidate, answer.certificates, keys)

    def write() -> None:
        for service in joined.identities:
            _write_identity(joined, service, answer.certificates[service], keys[service][1])
        if bundle != joined.ca_bundle:
            joined.ca_bundle = bundle
            _write_ca(joined)

    await trio.to_thread.run_sync(write)
    await trio.to_thread.run_sync(swap)
