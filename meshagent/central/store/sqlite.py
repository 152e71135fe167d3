"""SqliteStore: the central agent's embedded store, one SQLite file.

Theory of operation:

* One connection, used only from worker threads (``trio.to_thread.run_sync``) one call
  at a time (a ``CapacityLimiter(1)`` per store), so the trio loop never waits on disk.
* Autocommit mode; every write is one ``BEGIN IMMEDIATE ... COMMIT`` transaction, so a
  write touching several rows (``apply_policies``, ``delete_mesh``) is all or nothing,
  and writers in other processes on the same file are serialised with ours (they wait
  up to ``BUSY_TIMEOUT_SECONDS``, then ``StoreUnavailable``).
* WAL journal; ``synchronous=FULL`` so a committed write (a consumed one-time token)
  survives a power cut; foreign keys cascade a mesh's deletion to its rows.
* The file is created 0600 (SQLite gives its -wal and -shm files the same mode).
* Schema history: ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``;
  ``PRAGMA user_version`` is the number applied and ``PRAGMA application_id`` marks the
  file as ours. ``open`` applies the missing ones, each in one transaction together
  with its version bump (a failed migration leaves the file as it was), and refuses a
  file from a newer meshagent or a SQLite file that is not ours. Migrations only ever
  get appended; a released one is never edited.
* ``wait_for_change``: a ``trio.Event`` per mesh, set after this store commits a change
  to that mesh; plus a poll of the revision every ``poll_interval_seconds`` for changes
  written by another process on the same file (the CLI while the central agent runs).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar

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
    StoreUnavailable,
    TokenKind,
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
from meshagent.log import get_logger

log = get_logger("central.store")

Migration = Callable[[sqlite3.Connection], None]
"""One schema step; runs inside the transaction that also bumps ``user_version``."""

APPLICATION_ID: Final = 0x6D657368  # "mesh"
BUSY_TIMEOUT_SECONDS: Final = 5.0

_T = TypeVar("_T")
_encode_names = msgspec.json.Encoder().encode
_decode_names = msgspec.json.Decoder(tuple[str, ...]).decode


# ---------------------------------------------------------------------------- schema history


_SCHEMA_V1 = (
    """CREATE TABLE meshes (
        name TEXT PRIMARY KEY NOT NULL,
        spec BLOB NOT NULL,
        ca BLOB NOT NULL,
        version INTEGER NOT NULL,
        created_at REAL NOT NULL
    )""",
    """CREATE TABLE policies (
        mesh TEXT NOT NULL REFERENCES meshes(name) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        spec BLOB NOT NULL,
        version INTEGER NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (mesh, kind, name)
    )""",
    """CREATE TABLE dataplanes (
        mesh TEXT NOT NULL REFERENCES meshes(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        node TEXT NOT NULL,
        address TEXT NOT NULL,
        services TEXT NOT NULL,
        spec BLOB NOT NULL,
        applied_version INTEGER NOT NULL,
        last_seen REAL NOT NULL,
        cert_not_after REAL,
        PRIMARY KEY (mesh, name)
    )""",
    """CREATE TABLE tokens (
        id TEXT PRIMARY KEY NOT NULL,
        mesh TEXT REFERENCES meshes(name) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        digest TEXT NOT NULL UNIQUE,
        services TEXT NOT NULL,
        meshes TEXT NOT NULL,
        expires_at REAL,
        uses_left INTEGER,
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX tokens_by_mesh ON tokens(mesh)",
    """CREATE TABLE audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        mesh TEXT,
        target TEXT NOT NULL,
        detail TEXT NOT NULL
    )""",
    "CREATE INDEX audit_by_time ON audit(at, seq)",
    "CREATE INDEX audit_by_mesh ON audit(mesh, at, seq)",
    # Outlives its mesh, so a mesh deleted and created again keeps counting up.
    """CREATE TABLE revisions (
        mesh TEXT PRIMARY KEY NOT NULL,
        revision INTEGER NOT NULL
    )""",
)


def _schema_v1(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _dataplane_last_error(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE dataplanes ADD COLUMN last_error TEXT NOT NULL DEFAULT ''")


def _dataplane_offline(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE dataplanes ADD COLUMN offline INTEGER NOT NULL DEFAULT 0")


def _ca_rotation(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE meshes ADD COLUMN previous_ca BLOB NOT NULL DEFAULT x''")
    conn.execute("ALTER TABLE dataplanes ADD COLUMN cert_issuers TEXT NOT NULL DEFAULT '[]'")


def _dataplane_unhealthy(conn: sqlite3.Connection) -> None:
    conn.execute("ALTER TABLE dataplanes ADD COLUMN unhealthy TEXT NOT NULL DEFAULT '[]'")


MIGRATIONS: Final[tuple[Migration, ...]] = (
    _schema_v1,
    _dataplane_last_error,
    _dataplane_offline,
    _ca_rotation,
    _dataplane_unhealthy,
)


# ---------------------------------------------------------------------------- the store


class SqliteStore:
    """The ``Store`` in one SQLite file. Open with ``await SqliteStore.open(path)``.

    Use as ``async with await SqliteStore.open(path) as store:`` or call ``aclose()``.
    Every method is a cancel point: cancelled before its worker thread starts, it did
    nothing; once started, it completes (the result is delivered, and the cancellation
    arrives at the caller's next checkpoint).
    """

    def __init__(
        self, conn: sqlite3.Connection, path: Path, *, poll_interval_seconds: float
    ) -> None:
        """Private: use ``SqliteStore.open``."""
        self.path = path
        self._conn: sqlite3.Connection | None = conn
        self._limiter = trio.CapacityLimiter(1)
        self._events: dict[str, trio.Event] = {}
        self._poll_interval_seconds = poll_interval_seconds

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        poll_interval_seconds: float = 1.0,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> SqliteStore:
        """Open (creating it 0600 if missing, with its directory 0700) and migrate. Cancel point.

        Args:
            path: the database file.
            poll_interval_seconds: how often ``wait_for_change`` looks for changes made
                by another process on the same file.
            migrations: the schema history (tests pass a shorter or longer one).

        Raises:
            StoreUnavailable: the file cannot be opened or created, is not a SQLite
                database, is another program's database, comes from a newer meshagent
                (its schema version is above ours), or a migration failed.
        """
        conn = await trio.to_thread.run_sync(_open_database, path, tuple(migrations))
        return cls(conn, path, poll_interval_seconds=poll_interval_seconds)

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
        """Close the database (idempotent) and wake every ``wait_for_change``. Cancel point."""
        conn, self._conn = self._conn, None
        events, self._events = self._events, {}
        for event in events.values():
            event.set()
        if conn is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(conn.close, limiter=self._limiter)

    # -- meshes ----------------------------------------------------------------------------

    async def create_mesh(self, record: MeshRecord) -> MeshRecord:
        """Store a new mesh at version 1. Cancel point.

        Raises:
            Conflict: the mesh exists. StoreUnavailable: the database failed.
            ValueError: a bad name or a spec that is not JSON.
        """
        check_mesh(record)
        stored = msgspec.structs.replace(record, version=1)

        def create(conn: sqlite3.Connection) -> MeshRecord:
            try:
                conn.execute(
                    f"INSERT INTO meshes ({_MESH_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        stored.name,
                        stored.spec,
                        stored.ca,
                        stored.version,
                        stored.created_at,
                        stored.previous_ca,
                    ),
                )
            except sqlite3.IntegrityError:
                raise Conflict(f"{mesh_ref(record.name)} already exists") from None
            _bump_revision(conn, record.name)
            return stored

        return await self._write(create, mesh=record.name)

    async def update_mesh(
        self, record: MeshRecord, *, expected_version: int | None = None
    ) -> MeshRecord:
        """Replace a mesh's spec, CA and previous CA; ``created_at`` stays. Cancel point.

        Raises:
            NotFound, Conflict (``expected_version`` mismatch), StoreUnavailable, ValueError.
        """
        check_mesh(record)

        def update(conn: sqlite3.Connection) -> MeshRecord:
            row = conn.execute(
                "SELECT version, created_at FROM meshes WHERE name = ?", (record.name,)
            ).fetchone()
            if row is None:
                raise NotFound(f"{mesh_ref(record.name)} not found")
            version, created_at = row
            if expected_version is not None and expected_version != version:
                raise version_conflict(mesh_ref(record.name), expected_version, version)
            stored = msgspec.structs.replace(record, version=version + 1, created_at=created_at)
            conn.execute(
                "UPDATE meshes SET spec = ?, ca = ?, previous_ca = ?, version = ? WHERE name = ?",
                (stored.spec, stored.ca, stored.previous_ca, stored.version, stored.name),
            )
            _bump_revision(conn, record.name)
            return stored

        return await self._write(update, mesh=record.name)

    async def get_mesh(self, name: str) -> MeshRecord:
        """Cancel point. Raises NotFound, StoreUnavailable."""

        def get(conn: sqlite3.Connection) -> MeshRecord:
            row = conn.execute(f"SELECT {_MESH_COLUMNS} FROM meshes WHERE name = ?", (name,))
            found = row.fetchone()
            if found is None:
                raise NotFound(f"{mesh_ref(name)} not found")
            return _mesh(found)

        return await self._read(get)

    async def list_meshes(self) -> list[MeshRecord]:
        """Every mesh, by name. Cancel point. Raises StoreUnavailable."""

        def list_(conn: sqlite3.Connection) -> list[MeshRecord]:
            rows = conn.execute(f"SELECT {_MESH_COLUMNS} FROM meshes ORDER BY name")
            return [_mesh(row) for row in rows]

        return await self._read(list_)

    async def delete_mesh(self, name: str) -> None:
        """Delete a mesh with its policies, dataplanes and tokens. Cancel point.

        Raises:
            NotFound, StoreUnavailable.
        """

        def delete(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM meshes WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"{mesh_ref(name)} not found")
            _bump_revision(conn, name)

        await self._write(delete, mesh=name)

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

        def put(conn: sqlite3.Connection) -> PolicyRecord:
            return _put_policies(conn, record.mesh, [record], expected)[0]

        return await self._write(put, mesh=record.mesh)

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
        batch = list(records)
        expected = dict(expected_versions or {})

        def apply(conn: sqlite3.Connection) -> list[PolicyRecord]:
            return _put_policies(conn, mesh, batch, expected)

        return await self._write(apply, mesh=mesh)

    async def get_policy(self, mesh: str, kind: str, name: str) -> PolicyRecord:
        """Cancel point. Raises NotFound, StoreUnavailable."""

        def get(conn: sqlite3.Connection) -> PolicyRecord:
            found = conn.execute(
                f"SELECT {_POLICY_COLUMNS} FROM policies WHERE mesh = ? AND kind = ? AND name = ?",
                (mesh, kind, name),
            ).fetchone()
            if found is None:
                raise NotFound(f"{policy_ref(mesh, kind, name)} not found")
            return _policy(found)

        return await self._read(get)

    async def list_policies(self, mesh: str, kind: str | None = None) -> list[PolicyRecord]:
        """A mesh's policies (of one kind), by (kind, name). Cancel point.

        Raises:
            StoreUnavailable.
        """

        def list_(conn: sqlite3.Connection) -> list[PolicyRecord]:
            if kind is None:
                rows = conn.execute(
                    f"SELECT {_POLICY_COLUMNS} FROM policies WHERE mesh = ? ORDER BY kind, name",
                    (mesh,),
                )
            else:
                rows = conn.execute(
                    f"SELECT {_POLICY_COLUMNS} FROM policies WHERE mesh = ? AND kind = ?"
                    " ORDER BY name",
                    (mesh, kind),
                )
            return [_policy(row) for row in rows]

        return await self._read(list_)

    async def delete_policy(
        self, mesh: str, kind: str, name: str, *, expected_version: int | None = None
    ) -> None:
        """Cancel point. Raises NotFound, Conflict (version mismatch), StoreUnavailable."""
        ref = policy_ref(mesh, kind, name)

        def delete(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT version FROM policies WHERE mesh = ? AND kind = ? AND name = ?",
                (mesh, kind, name),
            ).fetchone()
            if row is None:
                raise NotFound(f"{ref} not found")
            if expected_version is not None and expected_version != row[0]:
                raise version_conflict(ref, expected_version, row[0])
            conn.execute(
                "DELETE FROM policies WHERE mesh = ? AND kind = ? AND name = ?",
                (mesh, kind, name),
            )
            _bump_revision(conn, mesh)

        await self._write(delete, mesh=mesh)

    # -- dataplanes ------------------------------------------------------------------------

    async def put_dataplane(self, record: DataplaneRecord) -> DataplaneRecord:
        """Create or replace a dataplane. Cancel point.

        Raises:
            NotFound: the mesh does not exist. StoreUnavailable, ValueError.
        """
        check_dataplane(record)

        def put(conn: sqlite3.Connection) -> DataplaneRecord:
            _require_mesh(conn, record.mesh)
            conn.execute(
                f"INSERT INTO dataplanes ({_DATAPLANE_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (mesh, name) DO UPDATE SET node = excluded.node,"
                " address = excluded.address, services = excluded.services,"
                " spec = excluded.spec, applied_version = excluded.applied_version,"
                " last_seen = excluded.last_seen, cert_not_after = excluded.cert_not_after,"
                " last_error = excluded.last_error, offline = excluded.offline,"
                " cert_issuers = excluded.cert_issuers, unhealthy = excluded.unhealthy",
                (
                    record.mesh,
                    record.name,
                    record.node,
                    record.address,
                    _encode_names(record.services).decode(),
                    record.spec,
                    record.applied_version,
                    record.last_seen,
                    record.cert_not_after,
                    record.last_error,
                    int(record.offline),
                    _encode_names(record.cert_issuers).decode(),
                    _encode_names(record.unhealthy).decode(),
                ),
            )
            _bump_revision(conn, record.mesh)
            return record

        return await self._write(put, mesh=record.mesh)

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
        changed = False
        issuers = None if cert_issuers is None else _encode_names(tuple(cert_issuers)).decode()
        sick = None if unhealthy is None else tuple(sorted(set(unhealthy)))

        def update(conn: sqlite3.Connection) -> DataplaneRecord:
            nonlocal changed
            was = _get_dataplane(conn, mesh, name)
            conn.execute(
                "UPDATE dataplanes SET applied_version = ?, last_seen = ?, cert_not_after = ?,"
                " last_error = coalesce(?, last_error), offline = 0,"
                " cert_issuers = coalesce(?, cert_issuers), unhealthy = coalesce(?, unhealthy)"
                " WHERE mesh = ? AND name = ?",
                (
                    applied_version,
                    last_seen,
                    cert_not_after,
                    last_error,
                    issuers,
                    None if sick is None else _encode_names(sick).decode(),
                    mesh,
                    name,
                ),
            )
            if was.offline or (sick is not None and sick != was.unhealthy):
                changed = True
                _bump_revision(conn, mesh)
            return _get_dataplane(conn, mesh, name)

        # Only a dataplane that comes back or whose health changed changes the mesh;
        # the other heartbeats wake nobody.
        record = await self._write(update, mesh=None)
        if changed:
            self._wake(mesh)
        return record

    async def mark_dataplanes_offline(
        self, mesh: str, names: Sequence[str], *, seen_before: float
    ) -> list[str]:
        """See ``Store.mark_dataplanes_offline``. Cancel point. Raises StoreUnavailable."""
        wanted = sorted(set(names))
        if not wanted:
            return []

        def mark(conn: sqlite3.Connection) -> list[str]:
            marked = [
                name
                for name in wanted
                if conn.execute(
                    "UPDATE dataplanes SET offline = 1 WHERE mesh = ? AND name = ?"
                    " AND offline = 0 AND last_seen < ?",
                    (mesh, name, seen_before),
                ).rowcount
            ]
            if marked:
                _bump_revision(conn, mesh)
            return marked

        marked = await self._write(mark, mesh=None)
        if marked:
            self._wake(mesh)
        return marked

    async def get_dataplane(self, mesh: str, name: str) -> DataplaneRecord:
        """Cancel point. Raises NotFound, StoreUnavailable."""
        return await self._read(lambda conn: _get_dataplane(conn, mesh, name))

    async def list_dataplanes(self, mesh: str) -> list[DataplaneRecord]:
        """A mesh's dataplanes, by name. Cancel point. Raises StoreUnavailable."""

        def list_(conn: sqlite3.Connection) -> list[DataplaneRecord]:
            rows = conn.execute(
                f"SELECT {_DATAPLANE_COLUMNS} FROM dataplanes WHERE mesh = ? ORDER BY name",
                (mesh,),
            )
            return [_dataplane(row) for row in rows]

        return await self._read(list_)

    async def delete_dataplane(self, mesh: str, name: str) -> None:
        """Cancel point. Raises NotFound, StoreUnavailable."""

        def delete(conn: sqlite3.Connection) -> None:
            deleted = conn.execute(
                "DELETE FROM dataplanes WHERE mesh = ? AND name = ?", (mesh, name)
            ).rowcount
            if deleted == 0:
                raise NotFound(f"{dataplane_ref(mesh, name)} not found")
            _bump_revision(conn, mesh)

        await self._write(delete, mesh=mesh)

    # -- tokens ----------------------------------------------------------------------------

    async def create_token(self, record: TokenRecord) -> TokenRecord:
        """Cancel point.

        Raises:
            Conflict: a token with this id or digest exists.
            NotFound: ``record.mesh`` does not exist. StoreUnavailable, ValueError.
        """
        check_token(record)

        def create(conn: sqlite3.Connection) -> TokenRecord:
            if record.mesh is not None:
                _require_mesh(conn, record.mesh)
            if conn.execute("SELECT 1 FROM tokens WHERE id = ?", (record.id,)).fetchone():
                raise Conflict(f"{token_ref(record.id)} already exists")
            if conn.execute("SELECT 1 FROM tokens WHERE digest = ?", (record.digest,)).fetchone():
                raise Conflict(f"{digest_ref(record.digest)} already exists")
            conn.execute(
                f"INSERT INTO tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.mesh,
                    record.kind,
                    record.digest,
                    _encode_names(record.services).decode(),
                    _encode_names(record.meshes).decode(),
                    record.expires_at,
                    record.uses_left,
                    record.created_at,
                ),
            )
            return record

        return await self._write(create, mesh=None)

    async def get_token(self, token_id: str) -> TokenRecord:
        """Cancel point. Raises NotFound, StoreUnavailable, ValueError (a bad id)."""
        check_name("token id", token_id)

        def get(conn: sqlite3.Connection) -> TokenRecord:
            found = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE id = ?", (token_id,)
            ).fetchone()
            if found is None:
                raise NotFound(f"{token_ref(token_id)} not found")
            return _token(found)

        return await self._read(get)

    async def list_tokens(self, mesh: str | None = None) -> list[TokenRecord]:
        """Tokens (of one mesh), by id. Cancel point. Raises StoreUnavailable."""

        def list_(conn: sqlite3.Connection) -> list[TokenRecord]:
            if mesh is None:
                rows = conn.execute(f"SELECT {_TOKEN_COLUMNS} FROM tokens ORDER BY id")
            else:
                rows = conn.execute(
                    f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE mesh = ? ORDER BY id", (mesh,)
                )
            return [_token(row) for row in rows]

        return await self._read(list_)

    async def delete_token(self, token_id: str) -> None:
        """Cancel point. Raises NotFound, StoreUnavailable."""

        def delete(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount == 0:
                raise NotFound(f"{token_ref(token_id)} not found")

        await self._write(delete, mesh=None)

    async def consume_token(self, digest: str, now: float) -> TokenRecord:
        """Use a token once, in one transaction. Cancel point.

        See ``Store.consume_token``. Raises NotFound, StoreUnavailable, ValueError (digest).
        """
        check_digest(digest)

        def consume(conn: sqlite3.Connection) -> TokenRecord:
            row = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} FROM tokens WHERE digest = ?", (digest,)
            ).fetchone()
            token = None if row is None else _token(row)
            if token is None or not is_usable(token, now):
                raise NotFound(f"{digest_ref(digest)} not found, expired or used up")
            if token.uses_left is None:
                return token
            used = msgspec.structs.replace(token, uses_left=token.uses_left - 1)
            if used.uses_left == 0:
                conn.execute("DELETE FROM tokens WHERE id = ?", (token.id,))
            else:
                conn.execute(
                    "UPDATE tokens SET uses_left = ? WHERE id = ?", (used.uses_left, token.id)
                )
            return used

        return await self._write(consume, mesh=None)

    async def delete_expired_tokens(self, now: float) -> int:
        """Purge tokens expired by ``now``; returns how many. Cancel point.

        Raises:
            StoreUnavailable.
        """

        def purge(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM tokens WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).rowcount

        return await self._write(purge, mesh=None)

    # -- audit -----------------------------------------------------------------------------

    async def append_audit(self, record: AuditRecord) -> None:
        """Cancel point. Raises StoreUnavailable, ValueError (a bad mesh name)."""
        if record.mesh is not None:
            check_name("mesh name", record.mesh)

        def append(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.at,
                    record.actor,
                    record.action,
                    record.mesh,
                    record.target,
                    record.detail,
                ),
            )

        await self._write(append, mesh=None)

    async def list_audit(self, mesh: str | None = None, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` entries (of one mesh), newest first. Cancel point.

        Raises:
            StoreUnavailable.
        """

        limit = max(0, limit)  # SQLite reads a negative LIMIT as "no limit"

        def list_(conn: sqlite3.Connection) -> list[AuditRecord]:
            if mesh is None:
                rows = conn.execute(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit ORDER BY at DESC, seq DESC LIMIT ?",
                    (limit,),
                )
            else:
                rows = conn.execute(
                    f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE mesh = ?"
                    " ORDER BY at DESC, seq DESC LIMIT ?",
                    (mesh, limit),
                )
            return [_audit(row) for row in rows]

        return await self._read(list_)

    async def delete_audit_before(self, at: float) -> int:
        """Delete entries older than ``at`` (``audit_by_time`` index); returns how many.
        Cancel point.

        Raises:
            StoreUnavailable.
        """

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM audit WHERE at < ?", (at,)).rowcount

        return await self._write(delete, mesh=None)

    # -- change tracking -------------------------------------------------------------------

    async def mesh_revision(self, mesh: str) -> int:
        """The mesh's revision (0: never existed). Cancel point. Raises StoreUnavailable."""
        return await self._read(lambda conn: _revision(conn, mesh))

    async def wait_for_change(self, mesh: str, after_revision: int, timeout_seconds: float) -> int:
        """Long-poll the mesh's revision; see ``Store.wait_for_change``. Cancel point.

        Wakes at once for changes committed through this store, and within
        ``poll_interval_seconds`` for changes by other processes on the file.

        Raises:
            StoreUnavailable: the database failed, or the store was closed meanwhile.
        """
        deadline = trio.current_time() + timeout_seconds
        while True:
            # Take the event before reading, so a commit in between is not missed.
            event = self._events.setdefault(mesh, trio.Event())
            revision = await self.mesh_revision(mesh)  # read once even with no time left
            now = trio.current_time()
            if revision != after_revision or now >= deadline:
                return revision
            with trio.move_on_at(min(deadline, now + self._poll_interval_seconds)):
                await event.wait()

    # -- plumbing --------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in a worker thread; sqlite errors become StoreUnavailable."""
        return await trio.to_thread.run_sync(self._call, fn, limiter=self._limiter)

    async def _write(self, fn: Callable[[sqlite3.Connection], _T], *, mesh: str | None) -> _T:
        """Run ``fn`` in one transaction in a worker thread; wake ``mesh``'s waiters after."""

        def transaction(conn: sqlite3.Connection) -> _T:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        result = await trio.to_thread.run_sync(self._call, transaction, limiter=self._limiter)
        if mesh is not None:
            self._wake(mesh)
        return result

    def _wake(self, mesh: str) -> None:
        """Wake the ``wait_for_change`` calls of ``mesh`` (after a commit that changed it)."""
        event = self._events.pop(mesh, None)
        if event is not None:
            event.set()

    def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """In the worker thread: run ``fn`` on the open connection."""
        conn = self._conn
        if conn is None:
            raise StoreUnavailable(f"sqlite store {self.path} is closed")
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite store {self.path} failed: {_describe(exc)}") from None


# ---------------------------------------------------------------------------- rows


_MESH_COLUMNS = "name, spec, ca, version, created_at, previous_ca"
_POLICY_COLUMNS = "mesh, kind, name, spec, version, updated_at"
_DATAPLANE_COLUMNS = (
    "mesh, name, node, address, services, spec, applied_version, last_seen, cert_not_after,"
    " last_error, offline, cert_issuers, unhealthy"
)
_TOKEN_COLUMNS = "id, mesh, kind, digest, services, meshes, expires_at, uses_left, created_at"
_AUDIT_COLUMNS = "at, actor, action, mesh, target, detail"


def _mesh(row: Any) -> MeshRecord:
    name, spec, ca, version, created_at, previous_ca = row
    return MeshRecord(
        name=name,
        spec=bytes(spec),
        ca=bytes(ca),
        previous_ca=bytes(previous_ca),
        version=version,
        created_at=created_at,
    )


def _policy(row: Any) -> PolicyRecord:
    mesh, kind, name, spec, version, updated_at = row
    return PolicyRecord(
        mesh=mesh, kind=kind, name=name, spec=bytes(spec), version=version, updated_at=updated_at
    )


def _dataplane(row: Any) -> DataplaneRecord:
    mesh, name, node, address, services, spec, applied, last_seen, not_after, error, off = row[:11]
    issuers, unhealthy = row[11], row[12]
    return DataplaneRecord(
        mesh=mesh,
        name=name,
        node=node,
        address=address,
        services=_decode_names(services),
        spec=bytes(spec),
        applied_version=applied,
        last_seen=last_seen,
        cert_not_after=not_after,
        last_error=error,
        offline=bool(off),
        cert_issuers=_decode_names(issuers),
        unhealthy=_decode_names(unhealthy),
    )


def _token(row: Any) -> TokenRecord:
    token_id, mesh, kind, digest, services, meshes, expires_at, uses_left, created_at = row
    token_kind: TokenKind = kind
    return TokenRecord(
        id=token_id,
        mesh=mesh,
        kind=token_kind,
        digest=digest,
        services=_decode_names(services),
        meshes=_decode_names(meshes),
        expires_at=expires_at,
        uses_left=uses_left,
        created_at=created_at,
    )


def _audit(row: Any) -> AuditRecord:
    at, actor, action, mesh, target, detail = row
    return AuditRecord(at=at, actor=actor, action=action, mesh=mesh, target=target, detail=detail)


def _require_mesh(conn: sqlite3.Connection, mesh: str) -> None:
    if conn.execute("SELECT 1 FROM meshes WHERE name = ?", (mesh,)).fetchone() is None:
        raise NotFound(f"{mesh_ref(mesh)} not found")


def _get_dataplane(conn: sqlite3.Connection, mesh: str, name: str) -> DataplaneRecord:
    found = conn.execute(
        f"SELECT {_DATAPLANE_COLUMNS} FROM dataplanes WHERE mesh = ? AND name = ?", (mesh, name)
    ).fetchone()
    if found is None:
        raise NotFound(f"{dataplane_ref(mesh, name)} not found")
    return _dataplane(found)


def _revision(conn: sqlite3.Connection, mesh: str) -> int:
    row = conn.execute("SELECT revision FROM revisions WHERE mesh = ?", (mesh,)).fetchone()
    return 0 if row is None else int(row[0])


def _bump_revision(conn: sqlite3.Connection, mesh: str) -> None:
    conn.execute(
        "INSERT INTO revisions (mesh, revision) VALUES (?, 1)"
        " ON CONFLICT (mesh) DO UPDATE SET revision = revision + 1",
        (mesh,),
    )


def _put_policies(
    conn: sqlite3.Connection,
    mesh: str,
    records: Sequence[PolicyRecord],
    expected: Mapping[PolicyKey, int],
) -> list[PolicyRecord]:
    """Inside a transaction: check every expectation, then write every record."""
    _require_mesh(conn, mesh)
    stored: list[PolicyRecord] = []
    for record in records:
        row = conn.execute(
            "SELECT version FROM policies WHERE mesh = ? AND kind = ? AND name = ?",
            (mesh, record.kind, record.name),
        ).fetchone()
        current = 0 if row is None else int(row[0])
        want = expected.get((record.kind, record.name))
        if want is not None and want != current:
            raise version_conflict(policy_ref(mesh, record.kind, record.name), want, current)
        stored.append(msgspec.structs.replace(record, version=current + 1))
    conn.executemany(
        f"INSERT INTO policies ({_POLICY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (mesh, kind, name) DO UPDATE SET spec = excluded.spec,"
        " version = excluded.version, updated_at = excluded.updated_at",
        [(r.mesh, r.kind, r.name, r.spec, r.version, r.updated_at) for r in stored],
    )
    _bump_revision(conn, mesh)
    return stored


# ---------------------------------------------------------------------------- opening and migrating


def _open_database(path: Path, migrations: tuple[Migration, ...]) -> sqlite3.Connection:
    """In a worker thread: create (0600) or open the file, set it up, migrate it."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise StoreUnavailable(f"cannot open sqlite store {path}: {reason}") from None
    try:
        conn = sqlite3.connect(
            path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open sqlite store {path}: {_describe(exc)}") from None
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if mode.lower() != "wal":
            raise StoreUnavailable(
                f"sqlite store {path} cannot use a WAL journal (got {mode}); "
                "put it on a local filesystem"
            )
        conn.execute("PRAGMA synchronous = FULL")
        _migrate(conn, path, migrations)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(f"cannot use sqlite store {path}: {_describe(exc)}") from None
    except BaseException:
        conn.close()
        raise
    return conn


def _pragma(conn: sqlite3.Connection, name: str) -> int:
    return int(conn.execute(f"PRAGMA {name}").fetchone()[0])


def _migrate(conn: sqlite3.Connection, path: Path, migrations: tuple[Migration, ...]) -> None:
    """Apply the migrations ``path`` lacks, one transaction each.

    Raises:
        StoreUnavailable: a newer schema, another program's database, or a failed step.
    """
    latest = len(migrations)
    start = _pragma(conn, "user_version")
    _check_ours(conn, path, start, latest)
    for target in range(start + 1, latest + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = _pragma(conn, "user_version")  # another process may have migrated
            _check_ours(conn, path, current, latest)
            if current < target:
                migrations[target - 1](conn)
                conn.execute(f"PRAGMA user_version = {target:d}")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreUnavailable(
                f"sqlite store {path}: migrating the schema from version {target - 1} "
                f"to {target} failed ({_describe(exc)}); the file is unchanged"
            ) from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    if start < latest:
        log.info("sqlite store migrated", path=str(path), from_version=start, to_version=latest)


def _check_ours(conn: sqlite3.Connection, path: Path, version: int, latest: int) -> None:
    """Refuse a schema newer than ours, and SQLite files of other programs."""
    if version > latest:
        raise StoreUnavailable(
            f"sqlite store {path} has schema version {version}, newer than this meshagent "
            f"knows ({latest}): run a newer meshagent, or restore a backup of this version"
        )
    application_id = _pragma(conn, "application_id")
    if version == 0:
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        ours = application_id in (0, APPLICATION_ID) and tables == 0
    else:
        ours = application_id == APPLICATION_ID
    if not ours:
        raise StoreUnavailable(
            f"sqlite store {path} is another program's database; point the central agent "
            "at a new file"
        )


def _describe(exc: sqlite3.Error) -> str:
    """One lowercase line for a sqlite error ("database is locked")."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[0].lower() + text[1:]


if TYPE_CHECKING:  # mypy checks that SqliteStore is a Store

    def _is_store(store: SqliteStore) -> Store:
        return store


__all__ = ["APPLICATION_ID", "MIGRATIONS", "Migration", "SqliteStore"]
