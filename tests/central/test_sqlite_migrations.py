"""SqliteStore on disk: file mode, WAL, and the schema history (PRAGMA user_version)."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import msgspec
import pytest

from meshagent.central.store import MeshRecord, SqliteStore, StoreUnavailable
from meshagent.central.store.sqlite import APPLICATION_ID, MIGRATIONS

LATEST = len(MIGRATIONS)
MESH = MeshRecord(name="shop", spec=b'{"mtls": "strict"}', ca=b"ca", created_at=1.0)


def pragma(path: Path, name: str) -> object:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_new_store_is_0600_wal_and_at_the_latest_version(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "central.db"
    async with await SqliteStore.open(path) as store:
        await store.create_mesh(MESH)
        wal = path.with_name("central.db-wal")
        assert wal.exists()
        assert (mode(path), mode(wal)) == (0o600, 0o600)
    assert mode(path.parent) == 0o700
    assert pragma(path, "journal_mode") == "wal"
    assert pragma(path, "user_version") == LATEST
    assert pragma(path, "application_id") == APPLICATION_ID


@pytest.mark.parametrize("old_version", range(LATEST))
async def test_every_older_schema_is_migrated(tmp_path: Path, old_version: int) -> None:
    path = tmp_path / "central.db"
    async with await SqliteStore.open(path, migrations=MIGRATIONS[:old_version]):
        pass
    assert pragma(path, "user_version") == old_version
    async with await SqliteStore.open(path) as store:
        await store.create_mesh(MESH)
        assert [m.name for m in await store.list_meshes()] == ["shop"]
    assert pragma(path, "user_version") == LATEST


def insert_mesh_of_the_first_schema(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO meshes (name, spec, ca, version, created_at)"
        " VALUES ('shop', ?, ?, 1, 1.0)",
        (MESH.spec, MESH.ca),
    )


async def test_dataplanes_of_the_first_schema_gain_an_empty_last_error(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    async with await SqliteStore.open(path, migrations=MIGRATIONS[:1]):
        pass
    with sqlite3.connect(path) as conn:
        insert_mesh_of_the_first_schema(conn)
        conn.execute(
            "INSERT INTO dataplanes (mesh, name, node, address, services, spec,"
            " applied_version, last_seen, cert_not_after)"
            " VALUES ('shop', 'vm-1', 'vm-1', '10.0.0.1', '[\"web\"]', ?, 3, 5.0, NULL)",
            (b"{}",),
        )
    async with await SqliteStore.open(path) as store:
        found = await store.get_dataplane("shop", "vm-1")
    assert (found.services, found.applied_version, found.last_error) == (("web",), 3, "")
    assert found.offline is False  # schema 3: in the catalog until the leader says otherwise
    assert found.cert_issuers == ()  # schema 4: not known until it reports or renews
    assert found.unhealthy == ()  # schema 5: healthy until it reports otherwise


async def test_dataplanes_of_schema_4_gain_no_unhealthy_services(tmp_path: Path) -> None:
    """Schema 5 (health in the built-in catalog): a dataplane stored before it is
    healthy, and its first report that says otherwise is kept."""
    path = tmp_path / "central.db"
    async with await SqliteStore.open(path, migrations=MIGRATIONS[:4]):
        pass
    with sqlite3.connect(path) as conn:
        insert_mesh_of_the_first_schema(conn)
        conn.execute(
            "INSERT INTO dataplanes (mesh, name, node, address, services, spec,"
            " applied_version, last_seen, cert_not_after, last_error, offline, cert_issuers)"
            " VALUES ('shop', 'vm-1', 'vm-1', '10.0.0.1', '[\"web\"]', ?, 3, 5.0, NULL,"
            " '', 0, '[]')",
            (b"{}",),
        )
    async with await SqliteStore.open(path) as store:
        found = await store.get_dataplane("shop", "vm-1")
        assert (found.services, found.unhealthy, found.offline) == (("web",), (), False)
        before = await store.mesh_revision("shop")
        reported = await store.update_dataplane_status(
            "shop", "vm-1", applied_version=3, last_seen=6.0, cert_not_after=None,
            unhealthy=["web"],
        )
        assert reported.unhealthy == ("web",)
        assert await store.mesh_revision("shop") == before + 1
    assert pragma(path, "user_version") == LATEST
    async with await SqliteStore.open(path) as store:
        assert await store.get_dataplane("shop", "vm-1") == reported


async def test_meshes_of_schema_3_gain_no_previous_ca(tmp_path: Path) -> None:
    """Schema 4 (CA rotation): a mesh stored before it is not rotating."""
    path = tmp_path / "central.db"
    async with await SqliteStore.open(path, migrations=MIGRATIONS[:3]):
        pass
    with sqlite3.connect(path) as conn:
        insert_mesh_of_the_first_schema(conn)
    async with await SqliteStore.open(path) as store:
        found = await store.get_mesh("shop")
        assert (found.ca, found.previous_ca, found.version) == (b"ca", b"", 1)
        rotated = await store.update_mesh(
            msgspec.structs.replace(found, ca=b"new", previous_ca=b"ca")
        )
    assert pragma(path, "user_version") == LATEST
    async with await SqliteStore.open(path) as store:
        assert await store.get_mesh("shop") == rotated


async def test_a_new_migration_runs_once_and_keeps_the_data(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    runs: list[int] = []

    def add_mesh_notes(conn: sqlite3.Connection) -> None:
        runs.append(1)
        conn.execute("ALTER TABLE meshes ADD COLUMN note TEXT NOT NULL DEFAULT ''")
        conn.execute("UPDATE meshes SET note = 'migrated ' || name")

    async with await SqliteStore.open(path) as store:
        await store.create_mesh(MESH)
    history = (*MIGRATIONS, add_mesh_notes)
    for _ in range(2):
        async with await SqliteStore.open(path, migrations=history) as store:
            assert await store.get_mesh("shop") == MeshRecord(
                name="shop", spec=MESH.spec, ca=b"ca", version=1, created_at=1.0
            )
    assert runs == [1]
    assert pragma(path, "user_version") == LATEST + 1
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT note FROM meshes").fetchall() == [("migrated shop",)]


async def test_a_failed_migration_leaves_the_file_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "central.db"

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE scratch (x)")
        conn.execute("CREATE TABLE meshes (x)")  # exists: fails

    async with await SqliteStore.open(path) as store:
        await store.create_mesh(MESH)
    with pytest.raises(StoreUnavailable) as failed:
        await SqliteStore.open(path, migrations=(*MIGRATIONS, broken))
    text = str(failed.value)
    assert "\n" not in text
    assert f"from version {LATEST} to {LATEST + 1} failed" in text
    assert "unchanged" in text
    assert pragma(path, "user_version") == LATEST
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "scratch" not in tables
    async with await SqliteStore.open(path) as store:
        assert (await store.get_mesh("shop")).name == "shop"


async def test_a_store_from_a_newer_meshagent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    async with await SqliteStore.open(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {LATEST + 3}")
    with pytest.raises(StoreUnavailable) as refused:
        await SqliteStore.open(path)
    text = str(refused.value)
    assert "\n" not in text
    assert str(path) in text
    assert f"schema version {LATEST + 3}, newer than this meshagent knows ({LATEST})" in text
    assert pragma(path, "user_version") == LATEST + 3  # untouched


async def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreUnavailable, match="another program's database"):
        await SqliteStore.open(path)
    assert pragma(path, "user_version") == 0


async def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "central.db"
    path.write_bytes(b"this is not a database, just some text long enough" * 40)
    with pytest.raises(StoreUnavailable) as refused:
        await SqliteStore.open(path)
    text = str(refused.value)
    assert "\n" not in text and str(path) in text and "not a database" in text


async def test_an_unwritable_place_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StoreUnavailable) as refused:
        await SqliteStore.open(blocker / "central.db")  # its "directory" is a file
    assert "\n" not in str(refused.value) and "cannot open sqlite store" in str(refused.value)
