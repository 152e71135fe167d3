"""Dataplanes as the central agent keeps them, and the config it compiles for each one.
Pure (no trio, no store): functions over records.

Theory of operation:

* A dataplane is stored as a ``DataplaneRecord`` whose ``spec`` is the JSON of
  ``DataplaneSpec``: its inbounds and outbounds as it joined, and the id of its node
  credential (a ``TokenRecord`` of kind "node"). Only the token whose id the record
  names may act for the dataplane, so joining again under the same name (which writes
  a new record with a new credential) locks out the old credential.
* ``compile_config`` builds the ``DataplaneConfig`` of one dataplane at one mesh
  revision from the mesh record, its stored policies and its dataplanes:

  - routes: for each outbound, the TrafficRoute that governs (its source, its
    service), or the implicit rule to the service itself (``policy.compile``);
  - permissions: the TrafficPermissions of its inbound services;
  - request_policies: Timeouts and Retries of every service its routes reach;
  - mtls, default_allow and ca_bundle: from the mesh (the bundle holds the previous
    CA too during a CA rotation), and signing_ca, the fingerprint of the CA that
    signs now (the previous one while the new one is distributed): an agent whose
    certificates come from another renews them;
  - endpoints, the built-in catalog: for every service its routes reach, one endpoint
    per inbound of that service on every dataplane of the mesh (itself included)
    that is not marked ``offline``, at the dataplane's address, except where the
    dataplane reports that service ``unhealthy`` (its health probes fail). Every
    reachable service has an entry, empty when nothing serves it. When every online
    endpoint of a service is unhealthy the catalog lists them all (*panic*): routing
    to endpoints whose probes fail may still serve, routing to none cannot (see
    docs/architecture.md).

  The result depends only on its inputs, so one revision always compiles to one
  config. Heartbeats do not change the revision; what takes a silent dataplane out
  of the catalog is a stored flag, ``DataplaneRecord.offline``, whose every change
  bumps the revision: the leader sets it on the dataplanes ``silent_dataplanes``
  names (the rule ``is_online`` shows operators), the dataplane's next heartbeat
  clears it (``Store.mark_dataplanes_offline``, ``Store.update_dataplane_status``).
  Health is stored the same way: ``DataplaneRecord.unhealthy``, written by a status
  report, bumps the revision only when the set changes.
* A stored policy that no longer decodes (written by another meshagent version) is
  left out and reported in ``Compiled.skipped``, one line each, rather than failing
  every dataplane of the mesh.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from meshagent.central.joining import identities
from meshagent.central.meshes import decode_spec as decode_mesh_spec
from meshagent.central.meshes import is_on_ca, signing_fingerprint, trust_bundle
from meshagent.central.store import DataplaneRecord, MeshRecord, PolicyRecord
from meshagent.policy.compile import (
    compile_permissions,
    compile_request_policies,
    compile_route,
    select_route,
)
from meshagent.policy.load import PolicyError, decode
from meshagent.policy.model import Resource
from meshagent.snapshot.model import Endpoint, OutboundRoutes
from meshagent.snapshot.wire import (
    DataplaneConfig,
    DataplaneUpdate,
    InboundSpec,
    JoinRequest,
    OutboundSpec,
)

# Agents report their status this often (central.toml ``heartbeat_interval`` sets it, and
# the configs tell the agents); one not heard from for three heartbeats is offline.
HEARTBEAT_SECONDS: Final = 10.0
ONLINE_HEARTBEATS: Final = 3
ONLINE_WITHIN_SECONDS: Final = ONLINE_HEARTBEATS * HEARTBEAT_SECONDS
# Agents renew certificates of a CA that no longer signs within this many seconds
# (central.toml ``ca_rotation_spread``).
ROTATION_SPREAD_SECONDS: Final = 120.0


def online_window(heartbeat_seconds: float) -> float:
    """How long a dataplane stays online after a heartbeat."""
    return ONLINE_HEARTBEATS * heartbeat_seconds


class DataplaneSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What ``DataplaneRecord.spec`` holds (JSON). The node token's id is public."""

    inbounds: tuple[InboundSpec, ...] = ()
    outbounds: tuple[OutboundSpec, ...] = ()
    node_token_id: str


_decode_spec = msgspec.json.Decoder(DataplaneSpec).decode


def decode_spec(record: DataplaneRecord) -> DataplaneSpec:
    """Raises msgspec.DecodeError when the spec is not a ``DataplaneSpec``."""
    return _decode_spec(record.spec)


def new_dataplane(
    request: JoinRequest,
    *,
    node_token_id: str,
    now: float,
    cert_not_after: float,
    cert_issuers: tuple[str, ...] = (),
) -> DataplaneRecord:
    """The record of a dataplane that joins with a checked ``request``; ``cert_issuers``:
    the fingerprint of the CA that signed its certificates."""
    spec = DataplaneSpec(
        inbounds=tuple(request.inbounds),
        outbounds=tuple(request.outbounds),
        node_token_id=node_token_id,
    )
    return DataplaneRecord(
        mesh=request.mesh,
        name=request.dataplane,
        node=request.node,
        address=request.address,
        services=tuple(identities(request)),
        spec=msgspec.json.encode(spec),
        applied_version=0,
        last_seen=now,
        cert_not_after=cert_not_after,
        cert_issuers=cert_issuers,
    )


def updated_dataplane(record: DataplaneRecord, update: DataplaneUpdate) -> DataplaneRecord:
    """``record`` with the listeners, node and address of a checked ``update`` (same
    identities, same node credential, same status)."""
    spec = msgspec.structs.replace(
        decode_spec(record),
        inbounds=tuple(update.inbounds),
        outbounds=tuple(update.outbounds),
    )
    return msgspec.structs.replace(
        record, node=update.node, address=update.address, spec=msgspec.json.encode(spec)
    )


# ---------------------------------------------------------------------------- the view


def is_online(
    record: DataplaneRecord, now: float, *, within: float = ONLINE_WITHIN_SECONDS
) -> bool:
    """Was the dataplane heard from within ``within`` seconds (three heartbeats)?"""
    return now - record.last_seen <= within


def silent_dataplanes(
    records: Iterable[DataplaneRecord], *, now: float, within: float = ONLINE_WITHIN_SECONDS
) -> list[str]:
    """The names of dataplanes not online by ``is_online`` and not marked offline yet:
    what the leader marks offline. Pure."""
    return sorted(
        r.name for r in records if not r.offline and not is_online(r, now, within=within)
    )


def dataplane_view(
    record: DataplaneRecord,
    *,
    now: float,
    latest_version: int,
    within: float = ONLINE_WITHIN_SECONDS,
    current_ca: str = "",
    bundle_revision: int | None = None,
) -> dict[str, object]:
    """The admin API's JSON view of a dataplane (never a secret). ``in_catalog``: are
    its endpoints in the built-in catalog (false once the leader marked it offline).
    ``on_current_ca``: do all its certificates come from the mesh's CA (fingerprint
    ``current_ca``); null when it has not said (an older agent, before its renewal).
    ``has_new_bundle``: while a CA rotation distributes the new CA (``bundle_revision``
    given: the version from which configs carry it; 0 not recorded yet), has it
    applied such a config? null in any other phase.
    ``unhealthy``: its inbound services whose health probes fail, as it reported."""
    spec = decode_spec(record)
    on_current: bool | None = None
    if record.cert_issuers and current_ca:
        on_current = is_on_ca(record, current_ca)
    return {
        "name": record.name,
        "mesh": record.mesh,
        "node": record.node,
        "address": record.address,
        "services": list(record.services),
        "online": is_online(record, now, within=within),
        "in_catalog": not record.offline,
        "last_seen": record.last_seen,
        "applied_version": record.applied_version,
        "latest_version": latest_version,
        "cert_not_after": record.cert_not_after,
        "cert_issuers": list(record.cert_issuers),
        "on_current_ca": on_current,
        "has_new_bundle": (
            None
            if bundle_revision is None
            else bool(bundle_revision) and record.applied_version >= bundle_revision
        ),
        "unhealthy": list(record.unhealthy),
        "last_error": record.last_error,
        "inbounds": [msgspec.to_builtins(inbound) for inbound in spec.inbounds],
        "outbounds": [msgspec.to_builtins(outbound) for outbound in spec.outbounds],
        "node_token_id": spec.node_token_id,
    }


# ---------------------------------------------------------------------------- compiling


@dataclass(frozen=True, slots=True)
class Compiled:
    """A dataplane's config, and the stored policies left out of it (one line each)."""

    config: DataplaneConfig
    skipped: list[str]


def decode_policies(records: Iterable[PolicyRecord]) -> tuple[list[Resource], list[str]]:
    """The resources of stored policies, and one line for each that does not decode."""
    resources: list[Resource] = []
    skipped: list[str] = []
    for record in records:
        source = f"stored policy {record.kind}/{record.name} of mesh {record.mesh}"
        try:
            resources.append(decode(record.kind, record.spec, source=source))
        except PolicyError as exc:
            skipped.append(exc.summary())
    return resources, skipped


def compile_config(
    mesh: MeshRecord,
    *,
    revision: int,
    policies: Sequence[PolicyRecord],
    dataplane: DataplaneRecord,
    dataplanes: Sequence[DataplaneRecord],
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
    rotation_spread_seconds: float = ROTATION_SPREAD_SECONDS,
) -> Compiled:
    """The config of ``dataplane`` at mesh ``revision``.

    Args:
        mesh: the mesh record (mTLS mode, default_allow, CA certificate).
        revision: the mesh revision the inputs were read at (the config's version).
        policies: the mesh's stored policies.
        dataplane: the dataplane to compile for.
        dataplanes: every dataplane of the mesh (the built-in catalog's source; those
            marked offline are left out, and so are unhealthy services, see ``catalog``).
        heartbeat_seconds: how often the agent is to report its status.
        rotation_spread_seconds: the window over which agents renew certificates of a
            CA that no longer signs (central.toml ``ca_rotation_spread``).

    Raises:
        msgspec.DecodeError: a dataplane record whose spec is not a ``DataplaneSpec``.
    """
    mesh_spec = decode_mesh_spec(mesh)
    resources, skipped = decode_policies(policies)
    spec = decode_spec(dataplane)
    routes = compile_routes(resources, mesh=mesh.name, outbounds=spec.outbounds)
    reachable = sorted({service for route in routes.values() for service in route.services()})
    config = DataplaneConfig(
        version=revision,
        mesh=mesh.name,
        mtls=mesh_spec.mtls,
        ca_bundle=trust_bundle(mesh_spec),
        routes=routes,
        permissions=compile_permissions(
            resources, mesh=mesh.name, destinations=[i.service for i in spec.inbounds]
        ),
        default_allow=mesh_spec.default_allow,
        request_policies=compile_request_policies(resources, mesh=mesh.name, services=reachable),
        endpoints=catalog(reachable, dataplanes),
        heartbeat_seconds=heartbeat_seconds,
        signing_ca=signing_fingerprint(mesh_spec),
        rotation_spread_seconds=rotation_spread_seconds,
    )
    return Compiled(config=config, skipped=skipped)


def compile_routes(
    resources: Sequence[Resource], *, mesh: str, outbounds: Iterable[OutboundSpec]
) -> dict[str, OutboundRoutes]:
    """The routes of every outbound, by its service, as its source sees them."""
    return {
        outbound.service: compile_route(
            select_route(
                resources, mesh=mesh, source=outbound.source, destination=outbound.service
            ),
            outbound.service,
        )
        for outbound in outbounds
    }


def catalog(
    services: Iterable[str], dataplanes: Iterable[DataplaneRecord]
) -> dict[str, tuple[Endpoint, ...]]:
    """The built-in catalog: for each of ``services``, an endpoint per inbound serving
    it on any of ``dataplanes`` not marked offline and not reporting that service
    unhealthy, sorted by address (an empty tuple when none does).

    Panic: a service whose online endpoints are *all* unhealthy gets all of them, as
    Envoy's panic threshold does at 0 %: a probe that fails everywhere at once (a
    wrong probe, a shared dependency down) must not turn into "no endpoint" for every
    caller; the callers' passive ejection still skips those that refuse connections.
    """
    wanted = set(services)
    healthy: dict[str, list[Endpoint]] = {service: [] for service in sorted(wanted)}
    unhealthy: dict[str, list[Endpoint]] = {service: [] for service in wanted}
    for record in dataplanes:
        if record.offline:
            continue
        sick = set(record.unhealthy)
        for inbound in decode_spec(record).inbounds:
            if inbound.service in wanted:
                found = unhealthy if inbound.service in sick else healthy
                found[inbound.service].append(
                    Endpoint(
                        host=record.address,
                        port=inbound.port,
                        service=inbound.service,
                        node=record.node,
                        tags=tuple(sorted(inbound.tags.items())),
                    )
                )
    return {
        service: tuple(
            sorted(endpoints or unhealthy[service], key=lambda e: (e.host, e.port, e.node))
        )
        for service, endpoints in healthy.items()
    }


def panicking_services(
    services: Iterable[str], dataplanes: Iterable[DataplaneRecord]
) -> list[str]:
    """Those of ``services`` that the catalog lists in panic: served by online
    dataplanes, every one of which reports it unhealthy. Sorted. Pure."""
    wanted = set(services)
    seen: set[str] = set()
    healthy: set[str] = set()
    for record in dataplanes:
        if record.offline:
            continue
        for inbound in decode_spec(record).inbounds:
            if inbound.service in wanted:
                seen.add(inbound.service)
                if inbound.service not in record.unhealthy:
                    healthy.add(inbound.service)
    return sorted(seen - healthy)


__all__ = [
    "HEARTBEAT_SECONDS",
    "ONLINE_HEARTBEATS",
    "ONLINE_WITHIN_SECONDS",
    "Compiled",
    "DataplaneSpec",
    "catalog",
    "compile_config",
    "compile_routes",
    "dataplane_view",
    "decode_policies",
    "decode_spec",
    "is_online",
    "new_dataplane",
    "online_window",
    "panicking_services",
    "silent_dataplanes",
]
