"""The central agent's store: record types, errors and the ``Store`` protocol.

Theory of operation:

* Records are frozen msgspec Structs. ``spec`` fields are opaque JSON documents whose
  schema belongs to the policy and mesh code; the store checks only that they are JSON.
  ``MeshRecord.ca`` is an opaque blob (already encrypted by the caller).
* Versions are assigned by the store: a record is created at version 1 and every update
  adds 1. The ``version`` a caller passes in is ignored; optimistic concurrency goes
  through ``expected_version`` (0 = "must not exist yet"), which raises ``Conflict`` on
  a mismatch. Timestamps (``created_at``, ``updated_at``, ``last_seen``, ``at``) are the
  caller's clock: time is a parameter.
* Every mesh has a revision: a counter that never goes down, not even when the mesh is
  deleted and created again. Any change to the mesh record, its policies or its
  dataplanes (``put_dataplane``, ``delete_dataplane``) adds 1; tokens, audit entries and
  dataplane *status* reports (``update_dataplane_status``: heartbeats) do not, so
  agents long-polling ``wait_for_change`` wake only when their snapshot may change.
  Two status changes do change what agents see, and add 1: a dataplane marked offline
  (``mark_dataplanes_offline``: it leaves the built-in catalog) and the first heartbeat
  of a dataplane marked offline (it comes back).
* Deleting a mesh deletes its policies, dataplanes and tokens with it (audit stays).
* Names (mesh, policy kind and name, dataplane, token id) must be non-empty, at most
  253 characters, without ``/`` or control characters: they become keys.
* Errors: ``NotFound``, ``Conflict``, ``StoreUnavailable`` (all ``StoreError``), each
  ``str()`` one line naming the record. Malformed input (a bad name, a spec that is not
  JSON, a digest that is not a hex SHA-256) is the caller's bug: ``ValueError``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Final, Literal, Protocol

import msgspec

MAX_NAME_CHARS: Final = 253
# Consul transactions hold at most 64 operations; a batch needs two more (mesh, revision).
MAX_POLICIES_PER_APPLY: Final = 50

TokenKind = Literal["join", "admin", "node"]
PolicyKey = tuple[str, str]
"""(kind, name) of a policy within its mesh."""

_DIGEST = re.compile(r"[0-9a-f]{64}")
_decode_json = msgspec.json.Decoder().decode


# ---------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of the store's errors. ``str()`` is one line naming the record."""


class NotFound(StoreError):
    """The record (or the mesh it belongs to) does not exist."""


class Conflict(StoreError):
    """The record already exists, or its version is not the one expected."""


class StoreUnavailable(StoreError):
    """The store cannot answer: unreachable, failing, closed, or (SQLite) a schema this
    version of meshagent does not know. The message says which, and what to do."""


# ---------------------------------------------------------------------------- records


class MeshRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A mesh (tenant). ``spec``: JSON; ``ca``: opaque, already encrypted CA material.

    ``previous_ca``: during a CA rotation, the retiring CA's key (opaque, encrypted like
    ``ca``); empty otherwise. Finishing the rotation empties it.
    """

    name: str
    spec: bytes
    ca: bytes
    previous_ca: bytes = b""
    version: int = 0
    created_at: float


class PolicyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One policy document of a mesh, keyed by (mesh, kind, name). ``spec``: JSON."""

    mesh: str
    kind: str
    name: str
    spec: bytes
    version: int = 0
    updated_at: float


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A token: only the hex SHA-256 ``digest`` of its secret is stored, never the secret.

    ``mesh`` is the mesh a join/node token belongs to (None for admin tokens, which name
    theirs in ``meshes``); ``services`` limits what a join token may claim. A token
    expires at ``expires_at`` (None: never) and is gone after ``uses_left`` uses (None:
    unlimited; otherwise at least 1 when created).
    """

    id: str
    mesh: str | None
    kind: TokenKind
    digest: str
    services: tuple[str, ...] = ()
    meshes: tuple[str, ...] = ()
    expires_at: float | None = None
    uses_left: int | None = None
    created_at: float


class DataplaneRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One agent's dataplane in a mesh. ``spec``: JSON.

    ``applied_version`` (the snapshot version it runs), ``last_seen``,
    ``cert_not_after`` and ``last_error`` (why it refused the latest config; "" when
    it runs the latest one it was given) are its status, reported by
    ``update_dataplane_status``. ``cert_issuers``: the fingerprints (hex SHA-256) of the
    CAs that issued its certificates, as it last reported or was last signed; empty
    when unknown. ``offline``: the leader found it silent for longer
    than the online window (``mark_dataplanes_offline``), so the built-in catalog
    leaves its endpoints out; its next heartbeat clears it. ``unhealthy``: its inbound
    services whose health probes failed, as it last reported (sorted; empty when all
    pass or it does not say), which the built-in catalog leaves out too.
    """

    mesh: str
    name: str
    node: str
    address: str
    services: tuple[str, ...] = ()
    spec: bytes
    applied_version: int = 0
    last_seen: float
    cert_not_after: float | None = None
    last_error: str = ""
    offline: bool = False
    cert_issuers: tuple[str, ...] = ()
    unhealthy: tuple[str, ...] = ()


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the append-only audit log: who did what to which record, when.

    Entries are never changed; the leader deletes those older than ``audit_retention``
    (``Store.delete_audit_before``)."""

    at: float
    actor: str
    action: str
    mesh: str | None
    target: str
    detail: str = ""


# ---------------------------------------------------------------------------- the protocol


class Store(Protocol):
    """What the central agent needs from its store. Every method is a cancel point.

    A write that was cancelled before it reached the store did not happen; a write
    already under way finishes (SQLite) or was either applied whole or not at all
    (Consul: one transaction). Every method may raise ``StoreUnavailable``.
    """

    # -- meshes

    async def create_mesh(self, record: MeshRecord) -> MeshRecord:
        """Store a new mesh at version 1. Raises Conflict if it exists."""
        ...

    async def update_mesh(
        self, record: MeshRecord, *, expected_version: int | None = None
    ) -> MeshRecord:
        """Replace a mesh's spec, CA and previous CA (``created_at`` stays). Raises
        NotFound, Conflict."""
        ...

    async def get_mesh(self, name: str) -> MeshRecord:
        """Raises NotFound."""
        ...

    async def list_meshes(self) -> list[MeshRecord]:
        """Every mesh, by name."""
        ...

    async def delete_mesh(self, name: str) -> None:
        """Delete a mesh with its policies, dataplanes and tokens. Raises NotFound."""
        ...

    # -- policies

    async def put_policy(
        self, record: PolicyRecord, *, expected_version: int | None = None
    ) -> PolicyRecord:
        """Create (version 1) or update (version + 1) a policy.

        Raises:
            NotFound: the mesh does not exist.
            Conflict: ``expected_version`` is not the stored one (0: it exists).
        """
        ...

    async def apply_policies(
        self,
        mesh: str,
        records: Sequence[PolicyRecord],
        expected_versions: Mapping[PolicyKey, int] | None = None,
    ) -> list[PolicyRecord]:
        """Put several policies of one mesh, all or nothing (one revision step).

        Args:
            expected_versions: (kind, name) -> the version it must have now (0: must
                not exist); records not named here are written whatever their version.

        Returns:
            The stored records, in the order given.

        Raises:
            NotFound: the mesh does not exist.
            Conflict: an expected version did not match; nothing was written.
            ValueError: a record of another mesh, a (kind, name) twice, more than
                ``MAX_POLICIES_PER_APPLY`` records, or expectations for records not given.
        """
        ...

    async def get_policy(self, mesh: str, kind: str, name: str) -> PolicyRecord:
        """Raises NotFound."""
        ...

    async def list_policies(self, mesh: str, kind: str | None = None) -> list[PolicyRecord]:
        """A mesh's policies (of one kind), by (kind, name); empty for an unknown mesh."""
        ...

    async def delete_policy(
        self, mesh: str, kind: str, name: str, *, expected_version: int | None = None
    ) -> None:
        """Raises NotFound, Conflict (``expected_version`` not the stored one)."""
        ...

    # -- dataplanes

    async def put_dataplane(self, record: DataplaneRecord) -> DataplaneRecord:
        """Create or replace a dataplane. Raises NotFound when the mesh does not exist."""
        ...

    async def update_dataplane_status(
        self,
        mesh: str,
        name: str,
        *,
        applied_version: int,
        last_seen: float,
        cert_not_after: float | None,
        last_error: str | None = None,
        cert_issuers: Sequence[str] | None = None,
        unhealthy: Sequence[str] | None = None,
    ) -> DataplaneRecord:
        """Record a heartbeat; does not change the mesh revision, except for a
        dataplane marked ``offline`` (the flag is cleared: its endpoints return to the
        catalog) or one whose set of ``unhealthy`` services changes: then the revision
        goes up in the same write. Raises NotFound.

        ``last_error``: None keeps the stored one; "" clears it. ``cert_issuers``,
        ``unhealthy``: None keeps the stored ones; ``unhealthy`` is stored sorted,
        without repeats.
        """
        ...

    async def mark_dataplanes_offline(
        self, mesh: str, names: Sequence[str], *, seen_before: float
    ) -> list[str]:
        """Mark the named dataplanes ``offline``, each only if it is not yet and its
        ``last_seen`` is still before ``seen_before`` (a heartbeat that came meanwhile
        wins). One write and one revision step for all of them; none when nothing
        changed. Names that do not exist are skipped.

        Returns:
            The names marked, sorted.
        """
        ...

    async def get_dataplane(self, mesh: str, name: str) -> DataplaneRecord:
        """Raises NotFound."""
        ...

    async def list_dataplanes(self, mesh: str) -> list[DataplaneRecord]:
        """A mesh's dataplanes, by name; empty for an unknown mesh."""
        ...

    async def delete_dataplane(self, mesh: str, name: str) -> None:
        """Raises NotFound."""
        ...

    # -- tokens

    async def create_token(self, record: TokenRecord) -> TokenRecord:
        """Raises Conflict (same id or digest), NotFound (``record.mesh`` does not exist)."""
        ...

    async def get_token(self, token_id: str) -> TokenRecord:
        """One token by its id, expired or not (until purged).

        Raises:
            NotFound: no such token. ValueError: an id that cannot be a key.
        """
        ...

    async def list_tokens(self, mesh: str | None = None) -> list[TokenRecord]:
        """Tokens (whose ``mesh`` is this one), by id; expired ones included until purged."""
        ...

    async def delete_token(self, token_id: str) -> None:
        """Raises NotFound."""
        ...

    async def consume_token(self, digest: str, now: float) -> TokenRecord:
        """Use a token once, atomically: of concurrent consumers of its last use, one wins.

        Returns:
            The token as it is after this use (``uses_left`` decremented; a token whose
            last use this was is deleted and returned with ``uses_left=0``).

        Raises:
            NotFound: unknown, expired (``expires_at <= now``) or used up.
        """
        ...

    async def delete_expired_tokens(self, now: float) -> int:
        """Purge tokens that expired by ``now``; returns how many (a leader's job)."""
        ...

    # -- audit

    async def append_audit(self, record: AuditRecord) -> None:
        """Add one entry to the audit log."""
        ...

    async def list_audit(self, mesh: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` entries (of one mesh), newest first."""
        ...

    async def delete_audit_before(self, at: float) -> int:
        """Delete the entries (of every mesh) whose ``at`` is before ``at``; returns how
        many (a leader's job: audit retention). The only way entries leave the log."""
        ...

    # -- change tracking

    async def mesh_revision(self, mesh: str) -> int:
        """The mesh's revision; 0 for a mesh that never existed."""
        ...

    async def wait_for_change(self, mesh: str, after_revision: int, timeout_seconds: float) -> int:
        """Long-poll: wait until the revision differs from ``after_revision``.

        Returns:
            The new revision, at once if it already differs (greater, or smaller after a
            store was restored from a backup); when ``timeout_seconds`` pass without a
            change, the current revision (that is, ``after_revision``).
        """
        ...

    async def aclose(self) -> None:
        """Release the store's resources; later calls raise StoreUnavailable (SQLite)."""
        ...


# ---------------------------------------------------------------------------- names and checks


def mesh_ref(mesh: str) -> str:
    return f"mesh {mesh}"


def policy_ref(mesh: str, kind: str, name: str) -> str:
    return f"policy {kind}/{name} in mesh {mesh}"


def dataplane_ref(mesh: str, name: str) -> str:
    return f"dataplane {name} in mesh {mesh}"


def token_ref(token_id: str) -> str:
    return f"token {token_id}"


def digest_ref(digest: str) -> str:
    """A token named by the start of its digest (enough to find it; not the secret)."""
    return f"token sha256:{digest[:12]}"


def token_digest(secret: str | bytes) -> str:
    """The hex SHA-256 of a token secret: what the store keeps instead of the secret."""
    data = secret.encode() if isinstance(secret, str) else secret
    return hashlib.sha256(data).hexdigest()


def version_conflict(ref: str, expected: int, actual: int) -> Conflict:
    """The Conflict for an ``expected_version`` that does not match (0 = absent)."""
    if expected == 0:
        return Conflict(f"{ref} already exists (version {actual}); expected it to be new")
    if actual == 0:
        return Conflict(f"{ref} does not exist; expected version {expected}")
    return Conflict(f"{ref} is at version {actual}, not the expected {expected}")


def check_name(what: str, value: str) -> None:
    """Raise ValueError unless ``value`` can be a key segment (see the module docstring)."""
    if not value or len(value) > MAX_NAME_CHARS or value in (".", ".."):
        raise ValueError(f"{what} {value!r} must be 1 to {MAX_NAME_CHARS} characters")
    if "/" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{what} {value!r} must not contain '/' or control characters")


def check_json(what: str, data: bytes) -> None:
    """Raise ValueError unless ``data`` is one JSON document."""
    try:
        _decode_json(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{what}: spec is not JSON: {exc}") from None


def check_mesh(record: MeshRecord) -> None:
    check_name("mesh name", record.name)
    check_json(mesh_ref(record.name), record.spec)


def check_policy(record: PolicyRecord) -> None:
    check_name("mesh name", record.mesh)
    check_name("policy kind", record.kind)
    check_name("policy name", record.name)
    check_json(policy_ref(record.mesh, record.kind, record.name), record.spec)


def check_dataplane(record: DataplaneRecord) -> None:
    check_name("mesh name", record.mesh)
    check_name("dataplane name", record.name)
    check_json(dataplane_ref(record.mesh, record.name), record.spec)


def check_digest(digest: str) -> None:
    if not _DIGEST.fullmatch(digest):
        raise ValueError("token digest must be 64 lowercase hex characters (a SHA-256)")


def check_token(record: TokenRecord) -> None:
    check_name("token id", record.id)
    if record.mesh is not None:
        check_name("mesh name", record.mesh)
    check_digest(record.digest)
    if record.uses_left is not None and record.uses_left < 1:
        raise ValueError(f"{token_ref(record.id)}: uses_left must be at least 1 or None")


def check_batch(
    mesh: str,
    records: Sequence[PolicyRecord],
    expected_versions: Mapping[PolicyKey, int] | None,
) -> None:
    """The ValueErrors of ``Store.apply_policies``."""
    check_name("mesh name", mesh)
    if len(records) > MAX_POLICIES_PER_APPLY:
        raise ValueError(
            f"apply_policies to mesh {mesh}: {len(records)} policies, "
            f"at most {MAX_POLICIES_PER_APPLY} at once"
        )
    seen: set[PolicyKey] = set()
    for record in records:
        check_policy(record)
        if record.mesh != mesh:
            raise ValueError(
                f"apply_policies to mesh {mesh}: "
                f"{policy_ref(record.mesh, record.kind, record.name)} is in another mesh"
            )
        key = (record.kind, record.name)
        if key in seen:
            raise ValueError(f"apply_policies: {policy_ref(mesh, *key)} is given twice")
        seen.add(key)
    extra = set(expected_versions or {}) - seen
    if extra:
        kind, name = sorted(extra)[0]
        raise ValueError(
            f"apply_policies: expected version for {policy_ref(mesh, kind, name)}, "
            "which is not in the batch"
        )


def is_usable(token: TokenRecord, now: float) -> bool:
    """Can this token be consumed at ``now``?"""
    if token.expires_at is not None and token.expires_at <= now:
        return False
    return token.uses_left is None or token.uses_left > 0


__all__ = [
    "MAX_POLICIES_PER_APPLY",
    "AuditRecord",
    "Conflict",
    "DataplaneRecord",
    "MeshRecord",
    "NotFound",
    "PolicyKey",
    "PolicyRecord",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TokenKind",
    "TokenRecord",
    "token_digest",
]
