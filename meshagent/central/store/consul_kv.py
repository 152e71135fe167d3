"""ConsulKvStore: the ``Store`` in Consul KV, and ``LeaderElection`` over a Consul session.

Theory of operation (store):

* Layout under ``prefix`` (default ``meshagent/``); names never hold ``/``::

      meshes/<mesh>                    MeshRecord
      policies/<mesh>/<kind>/<name>    PolicyRecord
      dataplanes/<mesh>/<name>         DataplaneRecord
      revisions/<mesh>                 the mesh's revision, a decimal number
      tokens/<digest>                  TokenRecord (looked up by digest to consume it)
      token-ids/<id>                   the digest of token <id> (ids are unique)
      audit/mesh/<mesh>/<µs>-<rand>    AuditRecord of a mesh
      audit/global/<µs>-<rand>         AuditRecord of no mesh

  Values are JSON; ``spec`` documents are embedded as they are (``consul kv get`` shows
  them), the CA blob as base64. Record versions live in the JSON (1, 2, 3...), the same
  numbers as the SQLite store, not Consul's raft indexes.
* Every write is read-then-transaction: read the keys involved (``ModifyIndex``), decide,
  then one ``PUT /v1/txn`` whose ``cas``/``check-index`` operations hold only if nobody
  wrote those keys meanwhile, together with a ``cas`` on the mesh's revision key and a
  ``get`` of the mesh key (fails the transaction when the mesh is gone). Consul applies
  all of it or none. A transaction that failed on a ``cas`` lost a race with another
  writer (this replica or another): read again and retry (bounded, jittered). One that
  failed on a check with a meaning (mesh missing, key exists) raises that error.
* The revision key is outside the mesh's other keys, so it survives ``delete_mesh`` and
  keeps counting up when the mesh is created again. ``wait_for_change`` is a blocking
  query on it: Consul answers when it changes or the wait ends.
* Reads use Consul's default consistency (served by the leader), so any replica serves
  reads.
* Consul failures become ``StoreUnavailable`` naming the address. The ``ConsulClient``
  belongs to the caller: ``aclose()`` leaves it open.

Theory of operation (election): see ``LeaderElection``.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self, TypeVar

import msgspec
import trio

from meshagent.central.store.base import (
    AuditRecord,
    Conflict,
    DataplaneRecord,
    MeshRecord,
    NotFound,
    PolicyKey,
    PolicyRecord,
    Store,
    StoreError,
    StoreUnavailable,
    TokenRecord,
    check_batch,
    check_dataplane,
    check_digest,
    check_mesh,
    check_name,
    check_policy,
    check_token,
    dataplane_ref,
    digest_ref,
    is_usable,
    mesh_ref,
    policy_ref,
    token_ref,
    version_conflict,
)
from meshagent.discovery.consul import (
    ConsulClient,
    ConsulProblem,
    KvEntry,
    KvOp,
    TxnResult,
)
from meshagent.log import get_logger

log = get_logger("central.store")

# Writers racing on one mesh retry this often before giving up with StoreUnavailable.
MAX_ATTEMPTS: Final = 32
# Tokens deleted per transaction (three operations each; Consul allows 64).
_TOKENS_PER_TXN: Final = 20
# Audit entries deleted per transaction (two operations each).
_AUDIT_PER_TXN: Final = 32
# Dataplanes marked offline per transaction (one operation each, plus the revision).
_OFFLINE_PER_TXN: Final = 60

_T = TypeVar("_T")
_encode = msgspec.json.Encoder().encode


# ---------------------------------------------------------------------------- stored documents


class _MeshDoc(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    spec: msgspec.Raw
    ca: bytes
    version: int
    created_at: float
    previous_ca: bytes = b""  # added later (CA rotation): older documents have none


class _PolicyDoc(msgspec.Struct, frozen=True, kw_only=True):
    mesh: str
    kind: str
    name: str
    spec: msgspec.Raw
    version: int
    updated_at: float


class _DataplaneDoc(msgspec.Struct, frozen=True, kw_only=True):
    mesh: str
    name: str
    node: str
    address: str
    services: tuple[str, ...]
    spec: msgspec.Raw
    applied_version: int
    last_seen: float
    cert_not_after: float | None
    last_error: str = ""  # added later: older documents have none
    offline: bool = False  # added later: older documents have none
    cert_issuers: tuple[str, ...] = ()  # added later (CA rotation)
    unhealthy: tuple[str, ...] = ()  # added later (health in the built-in catalog)


def _mesh_doc(record: MeshRecord) -> bytes:
    return _encode(
        _MeshDoc(
            name=record.name,
            spec=msgspec.Raw(record.spec),
            ca=record.ca,
            version=record.version,
            created_at=record.created_at,
            previous_ca=record.previous_ca,
        )
    )


def _mesh_record(doc: _MeshDoc) -> MeshRecord:
    return MeshRecord(
        name=doc.name,
        spec=bytes(doc.spec),
        ca=doc.ca,
        previous_ca=doc.previous_ca,
        version=doc.version,
        created_at=doc.created_at,
    )


def _policy_doc(record: PolicyRecord) -> bytes:
    return _encode(
        _PolicyDoc(
            mesh=record.mesh,
            kind=record.kind,
            name=record.name,
            spec=msgspec.Raw(record.spec),
            version=record.version,
            updated_at=record.updated_at,
        )
    )


def _policy_record(doc: _PolicyDoc) -> PolicyRecord:
    return PolicyRecord(
        mesh=doc.mesh,
        kind=doc.kind,
        name=doc.name,
        spec=bytes(doc.spec),
        version=doc.version,
        updated_at=doc.updated_at,
    )


def _dataplane_doc(record: DataplaneRecord) -> bytes:
    return _encode(
        _DataplaneDoc(
            mesh=record.mesh,
            name=record.name,
            node=record.node,
            address=record.address,
            services=record.services,
            spec=msgspec.Raw(record.spec),
            applied_version=record.applied_version,
            last_seen=record.last_seen,
            cert_not_after=record.cert_not_after,
            last_error=record.last_error,
            offline=record.offline,
            cert_issuers=record.cert_issuers,
            unhealthy=record.unhealthy,
        )
    )


def _dataplane_record(doc: _DataplaneDoc) -> DataplaneRecord:
    return DataplaneRecord(
        mesh=doc.mesh,
        name=doc.name,
        node=doc.node,
        address=doc.address,
        services=doc.services,
        spec=bytes(doc.spec),
        applied_version=doc.applied_version,
        last_seen=doc.last_seen,
        cert_not_after=doc.cert_not_after,
        last_error=doc.last_error,
        offline=doc.offline,
        cert_issuers=doc.cert_issuers,
        unhealthy=doc.unhealthy,
    )


_decode_mesh = msgspec.json.Decoder(_MeshDoc).decode
_decode_policy = msgspec.json.Decoder(_PolicyDoc).decode
_decode_dataplane = msgspec.json.Decoder(_DataplaneDoc).decode
_decode_token = msgspec.json.Decoder(TokenRecord).decode
_decode_audit = msgspec.json.Decoder(AuditRecord).decode


@dataclass(frozen=True, slots=True)
class _Step:
    """One operation of a write, and what its failure means: ``None`` = we lost a race
    (read again and retry), otherwise the error to raise."""

    op: KvOp
    on_failure: StoreError | None = None


def _delete_unchanged(key: str, index: int) -> tuple[_Step, _Step]:
    """Delete ``key`` only if its ``ModifyIndex`` is still ``index`` (else: retry).

    Not ``delete-cas``: Consul (checked in 1.8.7) counts a ``delete-cas`` of a key that
    is already gone as a success, so two consumers of a one-use token would both win.
    ``check-index`` fails on a missing key.
    """
    return (
        _Step(KvOp(verb="check-index", key=key, index=index)),
        _Step(KvOp(verb="delete", key=key)),
    )


# ---------------------------------------------------------------------------- the store


class ConsulKvStore:
    """The ``Store`` in Consul KV under ``prefix``; see the module docstring.

    Every method is a cancel point. A cancelled write either committed whole (its
    transaction reached Consul) or not at all.

    Args:
        consul: the client to use; it stays the caller's (``aclose`` leaves it open).
        prefix: key prefix, ``""`` or ending in ``/``; one prefix per set of meshes.
        rng: randomness for retry jitter and audit keys.

    Raises:
        ValueError: a prefix that does not end in ``/`` or starts with one.
    """

    def __init__(
        self,
        consul: ConsulClient,
        prefix: str = "meshagent/",
        *,
        rng: random.Random | None = None,
    ) -> None:
        if prefix and (not prefix.endswith("/") or prefix.startswith("/")):
            raise ValueError(
                f"consul store prefix {prefix!r} must end in '/' and not start with it"
            )
        self._consul = consul
        self.prefix = prefix
        self._rng = rng or random.Random()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Nothing to release: the ConsulClient is the caller's. Cancel point."""
        await trio.lowlevel.checkpoint()

    # -- keys ------------------------------------------------------------------------------

    def _mesh_key(self, mesh: str) -> str:
        return f"{self.prefix}meshes/{mesh}"

    def _policies_prefix(self, mesh: str) -> str:
        return f"{self.prefix}policies/{mesh}/"

    def _policy_key(self, mesh: str, kind: str, name: str) -> str:
        return f"{self._policies_prefix(mesh)}{kind}/{name}"

    def _dataplanes_prefix(self, mesh: str) -> str:
        return f"{self.prefix}dataplanes/{mesh}/"

    def _dataplane_key(self, mesh: str, name: str) -> str:
        return f"{self._dataplanes_prefix(mesh)}{name}"

    def _revision_key(self, mesh: str) -> str:
        return f"{self.prefix}revisions/{mesh}"

    def _token_key(self, digest: str) -> str:
        return f"{self.prefix}tokens/{digest}"

    def _token_id_key(self, token_id: str) -> str:
        return f"{self.prefix}token-ids/{token_id}"

    def _audit_prefix(self, mesh: str | None) -> str:
        return f"{self.prefix}audit/" + ("global/" if mesh is None else f"mesh/{mesh}/")

    # -- meshes ----------------------------------------------------------------------------

    async def create_mesh(self, record: MeshRecord) -> MeshRecord:
        """Store a new mesh at version 1. Cancel point.

        Raises:
            Conflict: the mesh exists. StoreUnavailable: Consul failed.
            ValueError: a bad name or a spec that is not JSON.
        """
        check_mesh(record)
        stored = msgspec.structs.replace(record, version=1)
        key = self._mesh_key(record.name)
        exists = Conflict(f"{mesh_ref(record.name)} already exists")

        async def plan() -> tuple[list[_Step], MeshRecord]:
            create = KvOp(verb="cas", key=key, value=_mesh_doc(stored), index=0)
            return [_Step(create, exists), await self._revision_step(record.name)], stored

        return await self._commit(f"create {mesh_ref(record.name)}", plan)

    async def update_mesh(
        self, record: MeshRecord, *, expected_version: int | None = None
    ) -> MeshRecord:
        """Replace a mesh's spec and CA; ``created_at`` stays. Cancel point.

        Raises:
            NotFound, Conflict (``expected_version`` mismatch), StoreUnavailable, ValueError.
        """
        check_mesh(record)
        key = self._mesh_key(record.name)

        async def plan() -> tuple[list[_Step], MeshRecord]:
            entry = await self._get(key)
            if entry is None:
                raise NotFound(f"{mesh_ref(record.name)} not found")
            current = _mesh_record(self._decode(_decode_mesh, entry))
            if expected_version is not None and expected_version != current.version:
                raise version_conflict(mesh_ref(record.name), expected_version, current.version)
            stored = msgspec.structs.replace(
                record, version=current.version + 1, created_at=current.created_at
            )
            update = KvOp(verb="cas", key=key, value=_mesh_doc(stored), index=entry.modify_index)
            return [_Step(update), await self._revision_step(record.name)], stored

        return await self._commit(f"update {mesh_ref(record.name)}", plan)

    async def get_mesh(self, name: str) -> MeshRecord:
        """Cancel point. Raises NotFound, StoreUnavailable."""
        entry = await self._get(self._mesh_key(name))
        if entry is None:
            raise NotFound(f"{mesh_ref(name)} not found")
        return _mesh_record(self._decode(_decode_mesh, entry))

    async def list_meshes(self) -> list[MeshRecord]:
        """Every mesh, by name. Cancel point. Raises StoreUnavailable."""
        entries = await self._list(f"{self.prefix}meshes/")
        meshes = [_mesh_record(self._decode(_decode_mesh, e)) for e in entries]
        return sorted(meshes, key=lambda m: m.name)

    async def delete_mesh(self, name: str) -> None:
        """Delete a mesh with its policies and dataplanes (one transaction), then its
        tokens (tokens of a missing mesh cannot be consumed meanwhile). Cancel point.

        Raises:
            NotFound, StoreUnavailable.
        """
        key = self._mesh_key(name)

        async def plan() -> tuple[list[_Step], None]:
            entry = await self._get(key)
            if entry is None:
                raise NotFound(f"{mesh_ref(name)} not found")
            steps = [
                *_delete_unchanged(key, entry.modify_index),
                _Step(KvOp(verb="delete-tree", key=self._policies_prefix(name))),
                _Step(KvOp(verb="delete-tree", key=self._dataplanes_prefix(name))),
                await self._revision_step(name),
            ]
            return steps, None

        await self._commit(f"delete {mesh_ref(name)}", plan)
        await self._delete_tokens_where(lambda token, _meshes: token.mesh == name)

    # -- policies --------------------------------------------------------------------------

    async def put_policy(
        self, record: PolicyRecord, *, expected_version: int | None = None
    ) -> PolicyRecord:
        """Create (version 1) or update (version + 1) a policy. Cancel point.

        Raises:
            NotFound: the mesh does not exist.
            Conflict: ``expected_version`` is not the stored version (0: it exists).
            StoreUnavailable, ValueError.
        """
        check_policy(record)
        expected = (
            {} if expected_version is None else {(record.kind, record.name): expected_version}
        )
        [stored] = await self._put_policies(record.mesh, [record], expected)
        return stored

    async def apply_policies(
        self,
        mesh: str,
        records: Sequence[PolicyRecord],
        expected_versions: Mapping[PolicyKey, int] | None = None,
    ) -> list[PolicyRecord]:
        """Put several policies of one mesh in one transaction. Cancel point.

        See ``Store.apply_policies``. Raises NotFound, Conflict, StoreUnavailable, ValueError.
        """
        check_batch(mesh, records, expected_versions)
        return await self._put_policies(mesh, list(records), dict(expected_versions or {}))

    async def _put_policies(
        self, mesh: str, records: list[PolicyRecord], expected: Mapping[PolicyKey, int]
    ) -> list[PolicyRecord]:
        async def plan() -> tuple[list[_Step], list[PolicyRecord]]:
            if len(records) == 1:
                record = records[0]
                key = self._policy_key(mesh, record.kind, record.name)
                entry = await self._get(key)
                current = {key: entry} if entry is not None else {}
            else:
                current = {e.key: e for e in await self._list(self._policies_prefix(mesh))}
            steps = [self._mesh_exists_step(mesh)]
            stored: list[PolicyRecord] = []
            for record in records:
                key = self._policy_key(mesh, record.kind, record.name)
                entry = current.get(key)
                version = 0 if entry is None else self._decode(_decode_policy, entry).version
                want = expected.get((record.kind, record.name))
                if want is not None and want != version:
                    await self._require_mesh(mesh)  # a missing mesh is NotFound, as in SQLite
                    raise version_conflict(
                        policy_ref(mesh, record.kind, record.name), want, version
                    )
                new = msgspec.structs.replace(record, version=version + 1)
                index = 0 if entry is None else entry.modify_index
                steps.append(_Step(KvOp(verb="cas", key=key, value=_policy_doc(new), index=index)))
                stored.append(new)
            steps.append(await self._revision_step(mesh))
            return steps, stored

        what = f"write {len(records)} policies of {mesh_ref(mesh)}"
        return await self._commit(what, plan)

    async def get_policy(self, mesh: str, kind: str, name: str) -> PolicyRecord:
        """Cancel point. Raises NotFound, StoreUnavailable."""
        entry = await self._get(self._policy_key(mesh, kind, name))
        if entry is None:
            raise NotFound(f"{policy_ref(mesh, kind, name)} not found")
        return _policy_record(self._decode(_decode_policy, entry))

    async def list_policies(self, mesh: str, kind: str | None = None) -> list[PolicyRecord]:
        """A mesh's policies (of one kind), by (kind, name). Cancel point.

        Raises:
            StoreUnavailable.
        """
        prefix = self._policies_prefix(mesh) + ("" if kind is None else f"{kind}/")
        entries = await self._list(prefix)
        policies = [_policy_record(self._decode(_decode_policy, e)) for e in entries]
        return sorted(policies, key=lambda p: (p.kind, p.name))

    async def delete_policy(
        self, mesh: str, kind: str, name: str, *, expected_version: int | None = None
    ) -> None:
        """Cancel point. Raises NotFound, Conflict (version mismatch), StoreUnavailable."""
        ref = policy_ref(mesh, kind, name)
        key = self._policy_key(mesh, kind, name)

        async def plan() -> tuple[list[_Step], None]:
            entry = await self._get(key)
            if entry is None:
                raise NotFound(f"{ref} not found")
            version = self._decode(_decode_policy, entry).version
            if expected_version is not None and expected_version != version:
                raise version_conflict(ref, expected_version, version)
            steps = [*_delete_unchanged(key, entry.modify_index), await self._revision_step(mesh)]
            return steps, None

        await self._commit(f"delete {ref}", plan)

    # -- dataplanes ------------------------------------------------------------------------

    async def put_dataplane(self, record: DataplaneRecord) -> DataplaneRecord:
        """Create or replace a dataplane. Cancel point.

        Raises:
            NotFound: the mesh does not exist. StoreUnavailable, ValueError.
        """
        check_dataplane(record)
        key = self._dataplane_key(record.mesh, record.name)

        async def plan() -> tuple[list[_Step], DataplaneRecord]:
            put = KvOp(verb="set", key=key, value=_dataplane_doc(record))
            steps = [
                self._mesh_exists_step(record.mesh),
                _Step(put),
                await self._revision_step(record.mesh),
            ]
            return steps, record

        return await self._commit(f"write {dataplane_ref(record.mesh, record.name)}", plan)

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
        """Record a heartbeat without changing the mesh revision, unless the dataplane
        was marked offline (then it is back: flag cleared) or its set of unhealthy
        services changed: then revision + 1 in the same transaction. Cancel point.

        ``last_error``, ``cert_issuers``, ``unhealthy``: None keeps the stored ones.

        Raises:
            NotFound, StoreUnavailable.
        """
        ref = dataplane_ref(mesh, name)
        key = self._dataplane_key(mesh, name)

        async def plan() -> tuple[list[_Step], DataplaneRecord]:
            entry = await self._get(key)
            if entry is None:
                raise NotFound(f"{ref} not found")
            current = _dataplane_record(self._decode(_decode_dataplane, entry))
            new = msgspec.structs.replace(
                current,
                applied_version=applied_version,
                last_seen=last_seen,
                cert_not_after=cert_not_after,
                last_error=current.last_error if last_error is None else last_error,
                offline=False,
                cert_issuers=(
                    current.cert_issuers if cert_issuers is None else tuple(cert_issuers)
                ),
                unhealthy=(
                    current.unhealthy if unhealthy is None else tuple(sorted(set(unhealthy)))
                ),
            )
            update = KvOp(verb="cas", key=key, value=_dataplane_doc(new), index=entry.modify_index)
            steps = [_Step(update)]
            if current.offline or new.unhealthy != current.unhealthy:
                steps.append(await self._revision_step(mesh))
            return steps, new

        return await self._commit(f"update the status of {ref}", plan)

    async def mark_dataplanes_offline(
        self, mesh: str, names: Sequence[str], *, seen_before: float
    ) -> list[str]:
        """See ``Store.mark_dataplanes_offline``: one transaction (``cas`` on every
        dataplane it marks, and on the revision), so a heartbeat written meanwhile makes
        it read again and decide again. At most ``_OFFLINE_PER_TXN`` dataplanes per
        call; the rest wait for the next call. Cancel point. Raises StoreUnavailable.
        """
        wanted = set(names)

        async def plan() -> tuple[list[_Step], list[str]]:
            steps: list[_Step] = []
            marked: list[str] = []
            for entry in await self._list(self._dataplanes_prefix(mesh)):
                current = _dataplane_record(self._decode(_decode_dataplane, entry))
                if (
                    current.name not in wanted
                    or current.offline
                    or current.last_seen >= seen_before
                ):
                    continue
                new = msgspec.structs.replace(current, offline=True)
                steps.append(
                    _Step(
                        KvOp(
                            verb="cas",
                            key=entry.key,
                            value=_dataplane_doc(new),
                            index=entry.modify_index,
                        )
                    )
                )
                marked.append(current.name)
                if len(marked) == _OFFLINE_PER_TXN:
                    break
            if steps:
                steps.append(await self._revision_step(mesh))
            return steps, sorted(marked)

        if not wanted:
            return []
        return await self._commit(f"mark dataplanes of {mesh_ref(mesh)} offline", plan)

    async def get_dataplane(self, mesh: str, name: str) -> DataplaneRecord:
        """Cancel point. Raises NotFound, StoreUnavailable."""
        entry = await self._get(self._dataplane_key(mesh, name))
        if entry is None:
            raise NotFound(f"{dataplane_ref(mesh, name)} not found")
        return _dataplane_record(self._decode(_decode_dataplane, entry))

    async def list_dataplanes(self, mesh: str) -> list[DataplaneRecord]:
        """A mesh's dataplanes, by name. Cancel point. Raises StoreUnavailable."""
        entries = await self._list(self._dataplanes_prefix(mesh))
        dataplanes = [_dataplane_record(self._decode(_decode_dataplane, e)) for e in entries]
        return sorted(dataplanes, key=lambda d: d.name)

    async def delete_dataplane(self, mesh: str, name: str) -> None:
        """Cancel point. Raises NotFound, StoreUnavailable."""
        ref = dataplane_ref(mesh, name)
        key = self._dataplane_key(mesh, name)

        async def plan() -> tuple[list[_Step], None]:
            entry = await self._get(key)
            if entry is None:
                raise NotFound(f"{ref} not found")
            steps = [*_delete_unchanged(key, entry.modify_index), await self._revision_step(mesh)]
            return steps, None

        await self._commit(f"delete {ref}", plan)

    # -- tokens ----------------------------------------------------------------------------

    async def create_token(self, record: TokenRecord) -> TokenRecord:
        """Cancel point.

        Raises:
            Conflict: a token with this id or digest exists.
            NotFound: ``record.mesh`` does not exist. StoreUnavailable, ValueError.
        """
        check_token(record)

        async def plan() -> tuple[list[_Step], TokenRecord]:
            steps = [] if record.mesh is None else [self._mesh_exists_step(record.mesh)]
            by_id = KvOp(
                verb="cas",
                key=self._token_id_key(record.id),
                value=record.digest.encode(),
                index=0,
            )
            by_digest = KvOp(
                verb="cas", key=self._token_key(record.digest), value=_encode(record), index=0
            )
            steps.append(_Step(by_id, Conflict(f"{token_ref(record.id)} already exists")))
            steps.append(_Step(by_digest, Conflict(f"{digest_ref(record.digest)} already exists")))
            return steps, record

        return await self._commit(f"create {token_ref(record.id)}", plan)

    async def get_token(self, token_id: str) -> TokenRecord:
        """Two reads: the id's digest, then the token. Cancel point.

        Raises:
            NotFound, StoreUnavailable, ValueError (a bad id).
        """
        check_name("token id", token_id)
        missing = NotFound(f"{token_ref(token_id)} not found")
        by_id = await self._get(self._token_id_key(token_id))
        if by_id is None:
            raise missing
        digest = (by_id.value or b"").decode(errors="replace")
        try:
            check_digest(digest)
        except ValueError:
            raise StoreUnavailable(
                f"consul store {self.prefix}: key {by_id.key} does not hold a token digest"
            ) from None
        entry = await self._get(self._token_key(digest))
        token = None if entry is None else self._decode(_decode_token, entry)
        if token is None or token.id != token_id:  # consumed or deleted in between
            raise missing
        return token

    async def list_tokens(self, mesh: str | None = None) -> list[TokenRecord]:
        """Tokens (of one mesh), by id. Cancel point. Raises StoreUnavailable."""
        tokens = [self._decode(_decode_token, e) for e in await self._list(self._tokens_prefix)]
        return sorted((t for t in tokens if mesh is None or t.mesh == mesh), key=lambda t: t.id)

    async def delete_token(self, token_id: str) -> None:
        """Cancel point. Raises NotFound, StoreUnavailable."""
        ref = token_ref(token_id)
        id_key = self._token_id_key(token_id)

        async def plan() -> tuple[list[_Step], None]:
            entry = await self._get(id_key)
            if entry is None:
                raise NotFound(f"{ref} not found")
            digest = (entry.value or b"").decode(errors="replace")
            steps = [
                *_delete_unchanged(id_key, entry.modify_index),
                _Step(KvOp(verb="delete", key=self._token_key(digest))),
            ]
            return steps, None

        await self._commit(f"delete {ref}", plan)

    async def consume_token(self, digest: str, now: float) -> TokenRecord:
        """Use a token once: one transaction conditional on the token as read. Cancel point.

        See ``Store.consume_token``. Raises NotFound, StoreUnavailable, ValueError (digest).
        """
        check_digest(digest)
        key = self._token_key(digest)
        gone = NotFound(f"{digest_ref(digest)} not found, expired or used up")

        async def plan() -> tuple[list[_Step], TokenRecord]:
            entry = await self._get(key)
            token = None if entry is None else self._decode(_decode_token, entry)
            if entry is None or token is None or not is_usable(token, now):
                raise gone
            steps = []
            if token.mesh is not None:
                steps.append(_Step(KvOp(verb="get", key=self._mesh_key(token.mesh)), gone))
            if token.uses_left is None:
                if token.mesh is not None and await self._get(self._mesh_key(token.mesh)) is None:
                    raise gone
                return [], token
            used = msgspec.structs.replace(token, uses_left=token.uses_left - 1)
            if used.uses_left == 0:
                steps.extend(_delete_unchanged(key, entry.modify_index))
                steps.append(_Step(KvOp(verb="delete", key=self._token_id_key(token.id))))
            else:
                update = KvOp(verb="cas", key=key, value=_encode(used), index=entry.modify_index)
                steps.append(_Step(update))
            return steps, used

        return await self._commit(f"consume {digest_ref(digest)}", plan)

    async def delete_expired_tokens(self, now: float) -> int:
        """Purge tokens that expired by ``now``, and tokens left behind by a mesh deleted
        meanwhile; returns how many. Cancel point.

        Raises:
            StoreUnavailable.
        """

        def doomed(token: TokenRecord, meshes: set[str]) -> bool:
            if token.expires_at is not None and token.expires_at <= now:
                return True
            return token.mesh is not None and token.mesh not in meshes

        return await self._delete_tokens_where(doomed)

    @property
    def _tokens_prefix(self) -> str:
        return f"{self.prefix}tokens/"

    async def _delete_tokens_where(self, doomed: Callable[[TokenRecord, set[str]], bool]) -> int:
        """Delete the tokens ``doomed(token, existing mesh names)`` picks; how many."""
        deleted = 0
        for _ in range(MAX_ATTEMPTS):
            # Tokens first, then meshes: a token's mesh existed when it was created, so a
            # mesh missing from the later list was really deleted.
            entries = await self._list(self._tokens_prefix)
            meshes = {m.name for m in await self.list_meshes()}
            victims = [
                (entry, token)
                for entry in entries
                if doomed(token := self._decode(_decode_token, entry), meshes)
            ]
            raced = False
            for start in range(0, len(victims), _TOKENS_PER_TXN):
                ops: list[KvOp] = []
                for entry, token in victims[start : start + _TOKENS_PER_TXN]:
                    ops.extend(step.op for step in _delete_unchanged(entry.key, entry.modify_index))
                    ops.append(KvOp(verb="delete", key=self._token_id_key(token.id)))
                if (await self._txn(ops)).ok:
                    deleted += len(ops) // 3
                else:
                    raced = True  # one was consumed or deleted meanwhile: look again
            if not raced:
                break
        return deleted

    # -- audit -----------------------------------------------------------------------------

    async def append_audit(self, record: AuditRecord) -> None:
        """Cancel point. Raises StoreUnavailable."""
        if record.mesh is not None:
            check_name("mesh name", record.mesh)
        micros = max(0, round(record.at * 1_000_000))
        for _ in range(MAX_ATTEMPTS):
            key = f"{self._audit_prefix(record.mesh)}{micros:020d}-{self._rng.getrandbits(32):08x}"
            with self._consul_errors():
                if await self._consul.kv_put(key, _encode(record), cas=0):
                    return
        raise StoreUnavailable(f"consul store {self.prefix}: no free audit key at {record.at}")

    async def list_audit(self, mesh: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` entries (of one mesh), newest first. Cancel point.

        Lists every entry (of the mesh) from Consul; the leader's retention job
        (``delete_audit_before``) keeps that bounded. Raises StoreUnavailable.
        """
        prefix = f"{self.prefix}audit/" if mesh is None else self._audit_prefix(mesh)
        entries = await self._list(prefix)
        keyed = [(self._decode(_decode_audit, e), e.key.rsplit("/", 1)[-1]) for e in entries]
        keyed.sort(key=lambda pair: (pair[0].at, pair[1]), reverse=True)
        return [record for record, _ in keyed[: max(0, limit)]]

    async def delete_audit_before(self, at: float) -> int:
        """Delete entries older than ``at``; returns how many. Cancel point.

        Lists every entry, then deletes the old ones, ``_AUDIT_PER_TXN`` per transaction,
        each only if unchanged (so two callers racing count each entry once; a lost race
        lists again, at most MAX_ATTEMPTS times).

        Raises:
            StoreUnavailable.
        """
        deleted = 0
        for _ in range(MAX_ATTEMPTS):
            entries = await self._list(f"{self.prefix}audit/")
            old = [e for e in entries if self._decode(_decode_audit, e).at < at]
            raced = False
            for start in range(0, len(old), _AUDIT_PER_TXN):
                batch = old[start : start + _AUDIT_PER_TXN]
                ops = [
                    step.op
                    for entry in batch
                    for step in _delete_unchanged(entry.key, entry.modify_index)
                ]
                if (await self._txn(ops)).ok:
                    deleted += len(batch)
                else:
                    raced = True  # someone deleted one meanwhile: look again
            if not raced:
                break
        return deleted

    # -- change tracking -------------------------------------------------------------------

    async def mesh_revision(self, mesh: str) -> int:
        """The mesh's revision (0: never existed). Cancel point. Raises StoreUnavailable."""
        return self._revision_of(await self._get(self._revision_key(mesh)))

    async def wait_for_change(self, mesh: str, after_revision: int, timeout_seconds: float) -> int:
        """Long-poll the mesh's revision with blocking queries on its revision key.

        See ``Store.wait_for_change``. Cancel point. Raises StoreUnavailable.
        """
        key = self._revision_key(mesh)
        deadline = trio.current_time() + timeout_seconds
        revision = after_revision
        index = 0  # 0: a plain read (always done once, even with no time left)
        while True:
            remaining = deadline - trio.current_time()
            if index and remaining <= 0:
                return revision
            # Consul may hold a blocking query up to wait/16 longer: our deadline wins.
            with trio.move_on_at(deadline if index else math.inf):
                with self._consul_errors():
                    new_index, entry = await self._consul.kv_get(
                        key, index=index, wait_seconds=remaining if index else 0
                    )
                revision = self._revision_of(entry)
                if revision != after_revision:
                    return revision
                # An index that went backwards means Consul lost its state: start over.
                index = 0 if new_index < index else max(new_index, 1)

    # -- plumbing --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _consul_errors(self) -> Iterator[None]:
        try:
            yield
        except ConsulProblem as exc:
            raise StoreUnavailable(f"consul store {self.prefix}: {exc}") from None

    async def _get(self, key: str) -> KvEntry | None:
        with self._consul_errors():
            _index, entry = await self._consul.kv_get(key)
        return entry

    async def _list(self, prefix: str) -> list[KvEntry]:
        with self._consul_errors():
            _index, entries = await self._consul.kv_list(prefix)
        return entries

    async def _txn(self, ops: Sequence[KvOp]) -> TxnResult:
        with self._consul_errors():
            return await self._consul.txn(ops)

    def _decode(self, decode: Callable[[bytes], _T], entry: KvEntry) -> _T:
        try:
            return decode(entry.value or b"")
        except msgspec.DecodeError as exc:
            raise StoreUnavailable(
                f"consul store {self.prefix}: key {entry.key} does not hold a meshagent record "
                f"({exc})"
            ) from None

    def _revision_of(self, entry: KvEntry | None) -> int:
        if entry is None:
            return 0
        try:
            return int((entry.value or b"").decode())
        except ValueError:
            raise StoreUnavailable(
                f"consul store {self.prefix}: key {entry.key} does not hold a revision number"
            ) from None

    async def _require_mesh(self, mesh: str) -> None:
        if await self._get(self._mesh_key(mesh)) is None:
            raise NotFound(f"{mesh_ref(mesh)} not found")

    def _mesh_exists_step(self, mesh: str) -> _Step:
        """Fails the transaction (NotFound) when the mesh is gone by then."""
        return _Step(
            KvOp(verb="get", key=self._mesh_key(mesh)), NotFound(f"{mesh_ref(mesh)} not found")
        )

    async def _revision_step(self, mesh: str) -> _Step:
        """Add 1 to the mesh's revision, on the condition that nobody else did meanwhile."""
        key = self._revision_key(mesh)
        entry = await self._get(key)
        value = str(self._revision_of(entry) + 1).encode()
        index = 0 if entry is None else entry.modify_index
        return _Step(KvOp(verb="cas", key=key, value=value, index=index))

    async def _commit(self, what: str, plan: Callable[[], Awaitable[tuple[list[_Step], _T]]]) -> _T:
        """Plan (read and decide) and run the transaction until it commits.

        ``plan`` raises the store errors it finds while reading; a transaction that fails
        on a step with ``on_failure`` raises that; one that lost a race is planned again,
        at most MAX_ATTEMPTS times (then StoreUnavailable).
        """
        last = ""
        for attempt in range(MAX_ATTEMPTS):
            steps, result = await plan()
            if not steps:
                return result
            outcome = await self._txn([step.op for step in steps])
            if outcome.ok:
                return result
            for error in outcome.errors:
                if 0 <= error.op_index < len(steps):
                    failure = steps[error.op_index].on_failure
                    if failure is not None:
                        raise failure
                last = error.what
            await trio.sleep(self._rng.uniform(0, min(0.5, 0.005 * 2**attempt)))
        raise StoreUnavailable(
            f"consul store {self.prefix}: could not {what} in {MAX_ATTEMPTS} attempts; "
            f"other writers kept changing it (last: {last})"
        )



if TYPE_CHECKING:  # mypy checks that ConsulKvStore is a Store

    def _is_store(store: ConsulKvStore) -> Store:
        return store


__all__ = ["MAX_ATTEMPTS", "ConsulKvStore"]
