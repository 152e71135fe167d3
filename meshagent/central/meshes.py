"""Meshes and their policies as the central agent stores them. Pure (no trio, no store).

Theory of operation:

* A mesh is stored as a ``MeshRecord`` whose ``spec`` is the JSON of ``MeshSpec``
  (mTLS mode, default_allow, CA kind, CA certificate PEM: all public) and whose ``ca`` is the CA's
  private key sealed with the operator's key (``pki.secrets.seal``, AES-256-GCM, the
  mesh name as associated data). A private key is never stored in clear.
* ``builtin``: the central agent makes the CA (``pki.ca.create_ca``). ``provided``: the
  operator's CA certificate and key must be a CA, belong together and name the mesh as
  their trust domain (``spiffe://<mesh>``), or the mesh is refused (``MeshError``).
* CA rotation (``start_rotation``, ``switch_signer``, ``finish_rotation``), in two
  phases. Starting it stores the new CA (made or provided) as ``ca_cert``/``ca`` and
  moves the old one to ``previous_ca_cert``/``previous_ca``; the trust bundle
  (``trust_bundle``: new first, then old) holds both. Phase ``distributing``: the OLD
  CA still signs (``signing_pair``, ``signing_fingerprint``), so no agent is handed a
  certificate that another agent cannot verify yet. ``bundle_revision`` is the mesh
  revision from which every config carries the new bundle (recorded just after the
  start); ``switch_decision`` says when to switch: once every online dataplane has
  applied a config of at least that version (``waiting_for_bundle``), or once
  ``timeout`` has passed since the start (the dataplanes still waiting are named).
  ``switch_signer`` then moves to phase ``renewing``: the new CA signs and agents
  renew within ``ca_rotation_spread``. Finishing drops the old CA from the bundle and
  its key from the record; it is refused while distributing, and while an online
  dataplane still holds a certificate that is not from the current CA
  (``still_on_previous_ca``), unless forced. A second rotation waits for the first
  to be finished. A spec written before phases existed has none: ``renewing``, which
  is what such a rotation was.
* Applying policies: every resource must name the mesh it is applied to; a (kind, name)
  appears once; each is stored as ``policy.load.encode``'s JSON. ``plan_apply`` compares
  with what is stored and says what is created, updated or unchanged, so only changes
  are written (with the versions read, so a concurrent writer makes it a conflict).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final, Literal

import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshagent.central.store import (
    MAX_POLICIES_PER_APPLY,
    DataplaneRecord,
    MeshRecord,
    PolicyRecord,
)
from meshagent.pki.ca import PemPair, ca_trust_domain, create_ca, public_der
from meshagent.pki.identity import NAME_RULE, is_valid_name
from meshagent.pki.rotation import ca_fingerprint
from meshagent.pki.secrets import seal, unseal
from meshagent.policy.load import encode
from meshagent.policy.model import Resource, kind_of

MtlsMode = Literal["off", "permissive", "strict"]
CaKind = Literal["builtin", "provided"]
MTLS_MODES: tuple[MtlsMode, ...] = ("off", "permissive", "strict")
RotationPhase = Literal["distributing", "renewing"]
# How long the old CA keeps signing at most while online dataplanes have not applied
# the new trust bundle (central.toml ``ca_rotation_switch_timeout``).
SWITCH_TIMEOUT_SECONDS: Final = 600.0


class MeshError(ValueError):
    """A mesh request that cannot be done as asked; ``str()`` is one line (HTTP 400)."""


class RotationConflict(MeshError):
    """A CA rotation step that the mesh's state does not allow now (HTTP 409)."""


class MeshSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What ``MeshRecord.spec`` holds (JSON). Public: no key material.

    ``default_allow``: may a service that no TrafficPermission names be called by every
    service of the mesh? True (the default) eases a migration; a strict mesh sets it to
    False, so only what a TrafficPermission allows gets through.
    """

    mtls: MtlsMode = "strict"
    default_allow: bool = True
    ca: CaKind = "builtin"
    ca_cert: str
    # During a CA rotation: the retiring CA (still trusted, no longer signing) and when
    # the rotation started; "" and None otherwise.
    previous_ca_cert: str = ""
    rotation_started_at: float | None = None
    # The phase of a rotation in progress: "distributing" (the new CA is in the bundle,
    # the previous one still signs) or "renewing" (the new CA signs). Specs written
    # before phases existed have none: their rotation is "renewing".
    rotation_phase: RotationPhase = "renewing"
    # While distributing: the mesh revision from which configs carry the new bundle
    # (0: not recorded yet). When the new CA started signing (None: not yet).
    bundle_revision: int = 0
    switched_at: float | None = None


def decode_spec(record: MeshRecord) -> MeshSpec:
    return msgspec.json.decode(record.spec, type=MeshSpec)


def encode_spec(spec: MeshSpec) -> bytes:
    return msgspec.json.encode(spec)


def check_mesh_name(name: str) -> None:
    """Raises MeshError unless ``name`` can be a mesh (and trust domain) name."""
    if not is_valid_name(name):
        raise MeshError(f'invalid mesh name "{name}": use {NAME_RULE}')


def new_mesh(
    name: str,
    *,
    mtls: MtlsMode,
    ca: CaKind,
    seal_key: bytes,
    now: float,
    ca_cert: str | None = None,
    ca_key: str | None = None,
    default_allow: bool = True,
) -> MeshRecord:
    """The record of a new mesh, its CA made (builtin) or checked (provided), key sealed.

    Raises:
        MeshError: a bad name, missing or extra CA material, or a provided CA that is
            unusable for this mesh.
    """
    check_mesh_name(name)
    if ca == "builtin":
        if ca_cert is not None or ca_key is not None:
            raise MeshError('ca_cert and ca_key go with ca = "provided" only')
        pair = create_ca(name, now=datetime.fromtimestamp(now, UTC))
        cert_pem, key_pem = pair.cert_pem, pair.key_pem
    else:
        if not ca_cert or not ca_key:
            raise MeshError('ca = "provided" needs both ca_cert and ca_key (PEM)')
        cert_pem, key_pem = ca_cert.encode(), ca_key.encode()
        check_provided_ca(name, cert_pem, key_pem, now=now)
    spec = MeshSpec(mtls=mtls, default_allow=default_allow, ca=ca, ca_cert=cert_pem.decode())
    return MeshRecord(
        name=name,
        spec=encode_spec(spec),
        ca=seal(seal_key, key_pem, context=name),
        created_at=now,
    )


def mesh_ca(record: MeshRecord, seal_key: bytes) -> PemPair:
    """The mesh's CA certificate and its key, unsealed (keep it in memory only).

    Raises:
        SecretError: the seal key is not the one the key was sealed with, or the blob
            was altered.
    """
    key_pem = unseal(seal_key, record.ca, context=record.name)
    return PemPair(decode_spec(record).ca_cert.encode(), key_pem)


def trust_bundle(spec: MeshSpec) -> str:
    """The CAs a dataplane of the mesh trusts: the current one, then during a rotation
    the previous one (PEM)."""
    if not spec.previous_ca_cert:
        return spec.ca_cert
    return spec.ca_cert.rstrip("\n") + "\n" + spec.previous_ca_cert


def is_rotating(record: MeshRecord) -> bool:
    return bool(decode_spec(record).previous_ca_cert)


def rotation_phase(spec: MeshSpec) -> RotationPhase | None:
    """The phase of the mesh's CA rotation; None when none is in progress."""
    return spec.rotation_phase if spec.previous_ca_cert else None


def signing_cert(spec: MeshSpec) -> str:
    """The PEM of the CA that signs now: the previous one while distributing."""
    return spec.previous_ca_cert if rotation_phase(spec) == "distributing" else spec.ca_cert


def signing_fingerprint(spec: MeshSpec) -> str:
    """The fingerprint of the CA that signs now (configs' ``signing_ca``)."""
    return ca_fingerprint(signing_cert(spec))


def signing_pair(record: MeshRecord, seal_key: bytes) -> PemPair:
    """The CA that signs now and its key, unsealed (keep it in memory only): the
    previous CA while distributing, the mesh's CA otherwise.

    Raises:
        SecretError: see ``mesh_ca``.
    """
    spec = decode_spec(record)
    if rotation_phase(spec) != "distributing":
        return mesh_ca(record, seal_key)
    key_pem = unseal(seal_key, record.previous_ca, context=record.name)
    return PemPair(spec.previous_ca_cert.encode(), key_pem)


def with_bundle_revision(record: MeshRecord, revision: int) -> MeshRecord | None:
    """The record with ``bundle_revision`` set to ``revision`` (a mesh revision read
    after the start of the rotation was stored); None when there is nothing to record
    (not distributing, or already recorded)."""
    spec = decode_spec(record)
    if rotation_phase(spec) != "distributing" or spec.bundle_revision or revision < 1:
        return None
    recorded = msgspec.structs.replace(spec, bundle_revision=revision)
    return msgspec.structs.replace(record, spec=encode_spec(recorded))


def waiting_for_bundle(
    record: MeshRecord,
    dataplanes: Sequence[DataplaneRecord],
    *,
    is_online: Callable[[DataplaneRecord], bool],
) -> list[str]:
    """While distributing: the names of the online dataplanes that have not applied a
    config carrying the new trust bundle (all online ones while ``bundle_revision`` is
    not recorded); [] in any other phase. Offline dataplanes never wait: they get the
    bundle with their next config, before anything else."""
    spec = decode_spec(record)
    if rotation_phase(spec) != "distributing":
        return []
    return sorted(
        d.name
        for d in dataplanes
        if is_online(d) and (not spec.bundle_revision or d.applied_version < spec.bundle_revision)
    )


@dataclass(frozen=True, slots=True)
class SwitchDecision:
    """What to do about a distributing rotation: ``switch`` now or wait; ``waiting``:
    the online dataplanes that have not applied the new bundle (when ``switch`` is
    true and ``waiting`` is not empty, it is the timeout that switches)."""

    switch: bool
    waiting: list[str]

    @property
    def timed_out(self) -> bool:
        return self.switch and bool(self.waiting)


def switch_decision(
    record: MeshRecord,
    dataplanes: Sequence[DataplaneRecord],
    *,
    is_online: Callable[[DataplaneRecord], bool],
    now: float,
    timeout_seconds: float = SWITCH_TIMEOUT_SECONDS,
) -> SwitchDecision | None:
    """Should the new CA start signing? None when the mesh is not distributing. Yes
    once the bundle revision is recorded and every online dataplane has applied it, or
    once ``timeout_seconds`` have passed since the start (whoever still waits)."""
    spec = decode_spec(record)
    if rotation_phase(spec) != "distributing":
        return None
    waiting = waiting_for_bundle(record, dataplanes, is_online=is_online)
    started = spec.rotation_started_at if spec.rotation_started_at is not None else now
    timed_out = now - started >= timeout_seconds
    return SwitchDecision(
        switch=(spec.bundle_revision > 0 and not waiting) or timed_out, waiting=waiting
    )


def switch_signer(record: MeshRecord, *, now: float) -> MeshRecord:
    """The record in phase "renewing": the new CA signs from now on.

    Raises:
        RotationConflict: the mesh is not distributing a new CA.
    """
    spec = decode_spec(record)
    if rotation_phase(spec) != "distributing":
        raise RotationConflict(f"mesh {record.name}: no new CA is being distributed")
    switched = msgspec.structs.replace(spec, rotation_phase="renewing", switched_at=now)
    return msgspec.structs.replace(record, spec=encode_spec(switched))


def _names(names: Sequence[str]) -> str:
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def start_rotation(
    record: MeshRecord,
    *,
    ca: CaKind,
    seal_key: bytes,
    now: float,
    ca_cert: str | None = None,
    ca_key: str | None = None,
) -> MeshRecord:
    """The record with a new CA in the trust bundle, phase "distributing": the current
    CA, kept as the previous one, still signs until ``switch_signer``. Its key stays
    sealed as it was.

    Raises:
        RotationConflict: a rotation is already in progress.
        MeshError: missing or extra CA material; a provided CA that is unusable for
            this mesh or is the current CA.
    """
    spec = decode_spec(record)
    if spec.previous_ca_cert:
        raise RotationConflict(
            f"mesh {record.name}: a CA rotation is already in progress; finish it first "
            f"(meshagent mesh rotate-ca {record.name} --finish)"
        )
    fresh = new_mesh(
        record.name,
        mtls=spec.mtls,
        ca=ca,
        seal_key=seal_key,
        now=now,
        ca_cert=ca_cert,
        ca_key=ca_key,
        default_allow=spec.default_allow,
    )
    new_spec = decode_spec(fresh)
    if ca_fingerprint(new_spec.ca_cert) == ca_fingerprint(spec.ca_cert):
        raise MeshError("ca_cert is the mesh's current CA; rotate to another CA")
    rotated = msgspec.structs.replace(
        new_spec,
        previous_ca_cert=spec.ca_cert,
        rotation_started_at=now,
        rotation_phase="distributing",
        bundle_revision=0,
        switched_at=None,
    )
    return msgspec.structs.replace(
        record, spec=encode_spec(rotated), ca=fresh.ca, previous_ca=record.ca
    )


def still_on_previous_ca(
    record: MeshRecord,
    dataplanes: Sequence[DataplaneRecord],
    *,
    is_online: Callable[[DataplaneRecord], bool],
) -> list[str]:
    """The names of the online dataplanes whose certificates are not all known to come
    from the mesh's current CA (a dataplane that never said is counted as not)."""
    current = ca_fingerprint(decode_spec(record).ca_cert)
    return sorted(d.name for d in dataplanes if is_online(d) and not is_on_ca(d, current))


def is_on_ca(dataplane: DataplaneRecord, fingerprint: str) -> bool:
    """Are all of ``dataplane``'s certificates known to be issued by that CA?"""
    return bool(dataplane.cert_issuers) and all(i == fingerprint for i in dataplane.cert_issuers)


def finish_rotation(
    record: MeshRecord,
    dataplanes: Sequence[DataplaneRecord],
    *,
    is_online: Callable[[DataplaneRecord], bool],
    force: bool = False,
) -> MeshRecord:
    """The record without its previous CA: dropped from the trust bundle, key deleted.

    Raises:
        RotationConflict: no rotation in progress; or (unless ``force``) online
            dataplanes still hold certificates of the previous CA (named, at most 10).
    """
    spec = decode_spec(record)
    if not spec.previous_ca_cert:
        raise RotationConflict(f"mesh {record.name}: no CA rotation in progress")
    if rotation_phase(spec) == "distributing":
        waiting = waiting_for_bundle(record, dataplanes, is_online=is_online)
        raise RotationConflict(
            f"mesh {record.name}: the new CA is still being distributed and the previous "
            "CA still signs every certificate; the central agent switches the signer when "
            "every online dataplane has applied the new trust bundle"
            + (f" (waiting for: {_names(waiting)})" if waiting else "")
            + "; finish after that"
        )
    behind = still_on_previous_ca(record, dataplanes, is_online=is_online)
    if behind and not force:
        shown = _names(behind)
        raise RotationConflict(
            f"mesh {record.name}: {len(behind)} online dataplane(s) still use certificates "
            f"of the previous CA: {shown}; wait for them to renew (meshagent get "
            "dataplanes), or finish anyway with --force"
        )
    finished = msgspec.structs.replace(
        spec,
        previous_ca_cert="",
        rotation_started_at=None,
        rotation_phase="renewing",
        bundle_revision=0,
        switched_at=None,
    )
    return msgspec.structs.replace(record, spec=encode_spec(finished), previous_ca=b"")


def rotation_view(
    record: MeshRecord,
    dataplanes: Sequence[DataplaneRecord],
    *,
    is_online: Callable[[DataplaneRecord], bool],
) -> dict[str, object]:
    """The API's JSON view of a mesh's CA rotation (fingerprints are public)."""
    spec = decode_spec(record)
    rotating = bool(spec.previous_ca_cert)
    phase = rotation_phase(spec)
    return {
        "mesh": record.name,
        "in_progress": rotating,
        "phase": phase,
        "ca_fingerprint": ca_fingerprint(spec.ca_cert),
        "previous_ca_fingerprint": ca_fingerprint(spec.previous_ca_cert) if rotating else None,
        "signing_ca_fingerprint": signing_fingerprint(spec),
        "started_at": spec.rotation_started_at,
        "bundle_revision": spec.bundle_revision if phase == "distributing" else None,
        "switched_at": spec.switched_at if rotating else None,
        "waiting_for_bundle": waiting_for_bundle(record, dataplanes, is_online=is_online),
        "still_on_previous_ca": (
            still_on_previous_ca(record, dataplanes, is_online=is_online) if rotating else []
        ),
    }


def check_provided_ca(mesh: str, cert_pem: bytes, key_pem: bytes, *, now: float) -> None:
    """Raises MeshError unless the PEMs are a valid CA of ``mesh`` and its key."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise MeshError("ca_cert is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise MeshError("ca_key is not an unencrypted PEM private key") from None
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise MeshError("ca_key does not belong to ca_cert")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise MeshError("ca_cert is not a CA certificate (BasicConstraints ca=false)")
    try:
        domain = ca_trust_domain(cert_pem)
    except ValueError as exc:
        raise MeshError(f"ca_cert: {exc}") from None
    if domain != mesh:
        raise MeshError(
            f"ca_cert is for trust domain spiffe://{domain}, not spiffe://{mesh}; "
            f"make one with: meshagent pki init-ca --mesh {mesh}"
        )
    if cert.not_valid_after_utc <= datetime.fromtimestamp(now, UTC):
        raise MeshError(f"ca_cert expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def with_settings(
    record: MeshRecord, *, mtls: MtlsMode | None = None, default_allow: bool | None = None
) -> MeshRecord:
    """The record with another mTLS mode and/or default_allow (None: unchanged; the CA
    stays)."""
    spec = decode_spec(record)
    if mtls is not None:
        spec = msgspec.structs.replace(spec, mtls=mtls)
    if default_allow is not None:
        spec = msgspec.structs.replace(spec, default_allow=default_allow)
    return msgspec.structs.replace(record, spec=encode_spec(spec))


def mesh_view(record: MeshRecord, *, with_ca_cert: bool) -> dict[str, object]:
    """The API's JSON view of a mesh (never the sealed key)."""
    spec = decode_spec(record)
    view: dict[str, object] = {
        "name": record.name,
        "mtls": spec.mtls,
        "default_allow": spec.default_allow,
        "ca": spec.ca,
        "ca_fingerprint": ca_fingerprint(spec.ca_cert),
        "rotating": bool(spec.previous_ca_cert),
        "version": record.version,
        "created_at": record.created_at,
    }
    if with_ca_cert:
        view["ca_cert"] = spec.ca_cert
    return view


# ---------------------------------------------------------------------------- policies


def encode_policy(resource: Resource) -> bytes:
    """The stored JSON of a resource (see ``policy.load.encode``)."""
    return encode(resource)


@dataclass(frozen=True, slots=True)
class ApplyPlan:
    """What applying a document changes: the records to write and a summary."""

    writes: list[PolicyRecord]
    expected_versions: dict[tuple[str, str], int]
    created: list[str]
    updated: list[str]
    unchanged: list[str]


def policy_records(
    mesh: str, resources: Sequence[Resource], *, now: float
) -> tuple[list[PolicyRecord], list[str]]:
    """The records of ``resources`` for ``mesh``, and every problem (one line each)."""
    problems: list[str] = []
    records: list[PolicyRecord] = []
    seen: set[tuple[str, str]] = set()
    for resource in resources:
        kind = kind_of(resource)
        label = f'{kind} "{resource.name}"'
        if resource.mesh != mesh:
            problems.append(
                f"{label}: mesh: is {resource.mesh!r}, but this document is applied to "
                f"mesh {mesh!r}"
            )
            continue
        if (kind, resource.name) in seen:
            problems.append(f"{label}: name: defined twice; names are unique per kind")
            continue
        seen.add((kind, resource.name))
        records.append(
            PolicyRecord(
                mesh=mesh,
                kind=kind,
                name=resource.name,
                spec=encode_policy(resource),
                updated_at=now,
            )
        )
    if len(records) > MAX_POLICIES_PER_APPLY:
        problems.append(
            f"{len(records)} resources in one document; at most {MAX_POLICIES_PER_APPLY} "
            "per mesh at once (split the file)"
        )
    return records, problems


def plan_apply(records: Sequence[PolicyRecord], current: Sequence[PolicyRecord]) -> ApplyPlan:
    """Compare ``records`` with the stored ``current`` ones of the same mesh."""
    stored = {(r.kind, r.name): r for r in current}
    plan = ApplyPlan(writes=[], expected_versions={}, created=[], updated=[], unchanged=[])
    for record in records:
        key = (record.kind, record.name)
        label = f"{record.kind}/{record.name}"
        old = stored.get(key)
        if old is None:
            plan.created.append(label)
            plan.expected_versions[key] = 0
        elif old.spec != record.spec:
            plan.updated.append(label)
            plan.expected_versions[key] = old.version
        else:
            plan.unchanged.append(label)
            continue
        plan.writes.append(record)
    return plan


def policy_view(record: PolicyRecord) -> dict[str, object]:
    """The API's JSON view of a stored policy."""
    return {
        "kind": record.kind,
        "name": record.name,
        "mesh": record.mesh,
        "version": record.version,
        "updated_at": record.updated_at,
        "spec": msgspec.json.decode(record.spec),
    }
