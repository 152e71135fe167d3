"""One suite, run against both stores: SQLite (a file) and Consul KV (a real Consul).

Every test gets a fresh, empty store through the parametrised ``store`` fixture;
``backend.open()`` gives a second handle on the same data (another central process on
the SQLite file; another replica against Consul).
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing

from meshagent.central.store import (
    MAX_POLICIES_PER_APPLY,
    AuditRecord,
    Conflict,
    ConsulKvStore,
    DataplaneRecord,
    MeshRecord,
    NotFound,
    PolicyRecord,
    SqliteStore,
    Store,
    StoreUnavailable,
    TokenRecord,
    token_digest,
)
from meshagent.demo.consul import ConsulProcess
from meshagent.demo.ports import free_port
from meshagent.discovery.consul import ConsulClient
from tests.central.conftest import Backend

NOW = 1_700_000_000.0
# Bytes that must come back exactly: odd spacing, unicode, nesting.
SPEC = b'{ "mtls": {"mode":  "strict"}, "note": "caf\xc3\xa9" }'
CA = b"\x00\x01encrypted-ca\xff" * 8


def mesh(name: str = "shop", *, spec: bytes = SPEC, ca: bytes = CA) -> MeshRecord:
    return MeshRecord(name=name, spec=spec, ca=ca, created_at=NOW)


def policy(
    name: str = "web", *, kind: str = "TrafficRoute", mesh: str = "shop", value: int = 1
) -> PolicyRecord:
    spec = json.dumps({"destination": name, "weight": value}).encode()
    return PolicyRecord(mesh=mesh, kind=kind, name=name, spec=spec, updated_at=NOW + value)


def dataplane(
    name: str = "host-a", *, mesh: str = "shop", address: str = "10.0.0.1"
) -> DataplaneRecord:
    return DataplaneRecord(
        mesh=mesh,
        name=name,
        node=f"node-{name}",
        address=address,
        services=("web", "api"),
        spec=b'{"inbound": [{"service": "web", "port": 8080}]}',
        applied_version=0,
        last_seen=NOW,
    )


def token(
    token_id: str = "tok-1",
    *,
    secret: str = "s3cret",
    mesh: str | None = "shop",
    uses_left: int | None = 1,
    expires_at: float | None = NOW + 3600,
) -> TokenRecord:
    return TokenRecord(
        id=token_id,
        mesh=mesh,
        kind="join" if mesh else "admin",
        digest=token_digest(secret),
        services=("web",) if mesh else (),
        meshes=() if mesh else ("shop", "blog"),
        expires_at=expires_at,
        uses_left=uses_left,
        created_at=NOW,
    )


def one_line_naming(exc: BaseException, *words: str) -> None:
    text = str(exc)
    assert "\n" not in text
    for word in words:
        assert word in text, text


# ---------------------------------------------------------------------------- meshes


async def test_mesh_create_get_list_round_trip_exact_bytes(store: Store) -> None:
    created = await store.create_mesh(mesh("shop"))
    assert created == MeshRecord(name="shop", spec=SPEC, ca=CA, version=1, created_at=NOW)
    assert await store.get_mesh("shop") == created
    await store.create_mesh(mesh("blog", spec=b"{}", ca=b""))
    assert [m.name for m in await store.list_meshes()] == ["blog", "shop"]
    with pytest.raises(Conflict) as exists:
        await store.create_mesh(mesh("shop"))
    one_line_naming(exists.value, "mesh shop", "already exists")


async def test_mesh_update_checks_expected_version_and_keeps_created_at(store: Store) -> None:
    await store.create_mesh(mesh())
    changed = MeshRecord(name="shop", spec=b'{"mtls": "off"}', ca=b"new-ca", created_at=NOW + 99)
    updated = await store.update_mesh(changed, expected_version=1)
    assert (updated.version, updated.created_at, updated.ca) == (2, NOW, b"new-ca")
    assert await store.get_mesh("shop") == updated
    with pytest.raises(Conflict) as stale:
        await store.update_mesh(changed, expected_version=1)
    one_line_naming(stale.value, "mesh shop", "version 2", "1")
    assert (await store.update_mesh(changed)).version == 3
    with pytest.raises(NotFound):
        await store.update_mesh(mesh("nope"))


async def test_missing_mesh_is_not_found_naming_it(store: Store) -> None:
    with pytest.raises(NotFound) as missing:
        await store.get_mesh("nope")
    one_line_naming(missing.value, "mesh nope", "not found")
    with pytest.raises(NotFound):
        await store.delete_mesh("nope")
    assert await store.list_meshes() == []


async def test_delete_mesh_takes_its_policies_dataplanes_and_tokens(store: Store) -> None:
    await store.create_mesh(mesh("shop"))
    await store.create_mesh(mesh("blog"))
    await store.put_policy(policy("web"))
    await store.put_policy(policy("web", mesh="blog"))
    await store.put_dataplane(dataplane("host-a"))
    await store.create_token(token("join-shop", secret="a"))
    await store.create_token(token("join-blog", secret="b", mesh="blog"))
    await store.create_token(token("admin", secret="c", mesh=None))

    await store.delete_mesh("shop")

    assert [m.name for m in await store.list_meshes()] == ["blog"]
    assert await store.list_policies("shop") == []
    assert await store.list_dataplanes("shop") == []
    assert [t.id for t in await store.list_tokens()] == ["admin", "join-blog"]
    with pytest.raises(NotFound):
        await store.consume_token(token_digest("a"), NOW)
    assert [p.mesh for p in await store.list_policies("blog")] == ["blog"]
    # Created again, it starts empty.
    await store.create_mesh(mesh("shop"))
    assert await store.list_policies("shop") == []


# ---------------------------------------------------------------------------- policies


async def test_policy_versions_count_up_from_one(store: Store) -> None:
    await store.create_mesh(mesh())
    first = await store.put_policy(policy("web", value=1))
    assert first == PolicyRecord(
        mesh="shop",
        kind="TrafficRoute",
        name="web",
        spec=policy("web").spec,
        version=1,
        updated_at=NOW + 1,
    )
    second = await store.put_policy(policy("web", value=2), expected_version=1)
    assert second.version == 2
    assert await store.get_policy("shop", "TrafficRoute", "web") == second
    assert (await store.put_policy(policy("web", value=3))).version == 3


async def test_policy_expected_version_mismatch_is_conflict(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_policy(policy("web"))
    with pytest.raises(Conflict) as stale:
        await store.put_policy(policy("web", value=2), expected_version=7)
    one_line_naming(stale.value, "policy TrafficRoute/web in mesh shop", "version 1", "7")
    with pytest.raises(Conflict) as exists:
        await store.put_policy(policy("web", value=2), expected_version=0)
    one_line_naming(exists.value, "TrafficRoute/web", "already exists")
    with pytest.raises(Conflict) as absent:
        await store.put_policy(policy("api"), expected_version=1)
    one_line_naming(absent.value, "TrafficRoute/api", "does not exist")
    assert (await store.put_policy(policy("api"), expected_version=0)).version == 1
    assert (await store.get_policy("shop", "TrafficRoute", "web")).version == 1


async def test_policy_in_missing_mesh_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound) as missing:
        await store.put_policy(policy(mesh="nope"))
    one_line_naming(missing.value, "mesh nope")
    with pytest.raises(NotFound):
        await store.put_policy(policy(mesh="nope"), expected_version=3)
    with pytest.raises(NotFound) as no_policy:
        await store.get_policy("nope", "TrafficRoute", "web")
    one_line_naming(no_policy.value, "policy TrafficRoute/web in mesh nope", "not found")


async def test_list_policies_sorted_by_kind_then_name(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.create_mesh(mesh("shop2"))
    for kind, name in [
        ("Timeout", "b"),
        ("TrafficRoute", "z"),
        ("Timeout", "a-b"),
        ("Timeout", "a"),
        ("Traffic", "x"),
    ]:
        await store.put_policy(policy(name, kind=kind))
    await store.put_policy(policy("other", mesh="shop2"))
    listed = [(p.kind, p.name) for p in await store.list_policies("shop")]
    assert listed == [
        ("Timeout", "a"),
        ("Timeout", "a-b"),
        ("Timeout", "b"),
        ("Traffic", "x"),
        ("TrafficRoute", "z"),
    ]
    assert [p.name for p in await store.list_policies("shop", "Timeout")] == ["a", "a-b", "b"]
    assert [p.name for p in await store.list_policies("shop", "Traffic")] == ["x"]
    assert await store.list_policies("nope") == []


async def test_delete_policy(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_policy(policy("web"))
    await store.put_policy(policy("web"))
    with pytest.raises(Conflict):
        await store.delete_policy("shop", "TrafficRoute", "web", expected_version=1)
    await store.delete_policy("shop", "TrafficRoute", "web", expected_version=2)
    with pytest.raises(NotFound) as gone:
        await store.delete_policy("shop", "TrafficRoute", "web")
    one_line_naming(gone.value, "policy TrafficRoute/web in mesh shop")
    assert await store.list_policies("shop") == []


async def test_apply_policies_writes_all_with_one_revision(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_policy(policy("web"))
    before = await store.mesh_revision("shop")
    stored = await store.apply_policies(
        "shop",
        [policy("web", value=2), policy("api"), policy("slow", kind="Timeout")],
        {("TrafficRoute", "web"): 1, ("TrafficRoute", "api"): 0},
    )
    assert [(p.name, p.version) for p in stored] == [("web", 2), ("api", 1), ("slow", 1)]
    assert await store.mesh_revision("shop") == before + 1
    assert await store.list_policies("shop") == sorted(stored, key=lambda p: (p.kind, p.name))


async def test_apply_policies_is_all_or_nothing(store: Store) -> None:
    await store.create_mesh(mesh())
    web = await store.put_policy(policy("web"))
    before = await store.mesh_revision("shop")
    with pytest.raises(Conflict) as stale:
        await store.apply_policies(
            "shop",
            [policy("new-one"), policy("web", value=9), policy("slow", kind="Timeout")],
            {("TrafficRoute", "web"): 5},
        )
    one_line_naming(stale.value, "policy TrafficRoute/web in mesh shop", "5")
    assert await store.list_policies("shop") == [web]
    assert await store.mesh_revision("shop") == before
    with pytest.raises(NotFound):
        await store.apply_policies("nope", [policy("web", mesh="nope")])


async def test_apply_policies_rejects_malformed_batches(store: Store) -> None:
    await store.create_mesh(mesh())
    with pytest.raises(ValueError, match="another mesh"):
        await store.apply_policies("shop", [policy("web", mesh="blog")])
    with pytest.raises(ValueError, match="twice"):
        await store.apply_policies("shop", [policy("web"), policy("web", value=2)])
    with pytest.raises(ValueError, match="at most"):
        await store.apply_policies(
            "shop", [policy(f"p{i}") for i in range(MAX_POLICIES_PER_APPLY + 1)]
        )
    with pytest.raises(ValueError, match="not in the batch"):
        await store.apply_policies("shop", [policy("web")], {("Timeout", "web"): 1})
    # The largest batch fits (Consul: one transaction of at most 64 operations).
    big = await store.apply_policies(
        "shop", [policy(f"p{i:02d}") for i in range(MAX_POLICIES_PER_APPLY)]
    )
    assert len(big) == MAX_POLICIES_PER_APPLY
    assert len(await store.list_policies("shop")) == MAX_POLICIES_PER_APPLY


async def test_concurrent_writers_with_the_same_expected_version_one_wins(
    backend: Backend, store: Store
) -> None:
    await store.create_mesh(mesh())
    await store.put_policy(policy("web"))
    outcomes: list[str] = []
    async with backend.open() as other:

        async def write(handle: Store, value: int) -> None:
            try:
                await handle.put_policy(policy("web", value=value), expected_version=1)
            except Conflict:
                outcomes.append("conflict")
            else:
                outcomes.append("written")

        async with trio.open_nursery() as nursery:
            for value in range(6):
                nursery.start_soon(write, store if value % 2 else other, value)
    assert sorted(outcomes) == ["conflict"] * 5 + ["written"]
    assert (await store.get_policy("shop", "TrafficRoute", "web")).version == 2


async def test_concurrent_unconditional_writers_all_land(backend: Backend, store: Store) -> None:
    await store.create_mesh(mesh())
    before = await store.mesh_revision("shop")
    async with backend.open() as other, trio.open_nursery() as nursery:
        for value in range(8):
            nursery.start_soon(
                (store if value % 2 else other).put_policy, policy(f"p{value % 2}", value=value)
            )
    assert [p.version for p in await store.list_policies("shop")] == [4, 4]
    assert await store.mesh_revision("shop") == before + 8


# ---------------------------------------------------------------------------- dataplanes


async def test_dataplane_put_get_list_delete(store: Store) -> None:
    await store.create_mesh(mesh())
    stored = await store.put_dataplane(dataplane("host-b"))
    assert stored == dataplane("host-b")
    await store.put_dataplane(dataplane("host-a"))
    moved = await store.put_dataplane(dataplane("host-a", address="10.0.0.9"))
    assert await store.get_dataplane("shop", "host-a") == moved
    assert [d.name for d in await store.list_dataplanes("shop")] == ["host-a", "host-b"]
    await store.delete_dataplane("shop", "host-a")
    with pytest.raises(NotFound) as gone:
        await store.get_dataplane("shop", "host-a")
    one_line_naming(gone.value, "dataplane host-a in mesh shop")
    with pytest.raises(NotFound):
        await store.delete_dataplane("shop", "host-a")
    with pytest.raises(NotFound) as no_mesh:
        await store.put_dataplane(dataplane(mesh="nope"))
    one_line_naming(no_mesh.value, "mesh nope")


async def test_dataplane_status_is_not_a_change_of_the_mesh(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_dataplane(dataplane())
    revision = await store.mesh_revision("shop")
    status = await store.update_dataplane_status(
        "shop", "host-a", applied_version=7, last_seen=NOW + 30, cert_not_after=NOW + 86400
    )
    assert (status.applied_version, status.last_seen, status.cert_not_after) == (
        7,
        NOW + 30,
        NOW + 86400,
    )
    assert status.address == "10.0.0.1" and status.services == ("web", "api")
    assert await store.get_dataplane("shop", "host-a") == status
    assert await store.mesh_revision("shop") == revision
    with pytest.raises(NotFound):
        await store.update_dataplane_status(
            "shop", "ghost", applied_version=1, last_seen=NOW, cert_not_after=None
        )


async def test_dataplane_last_error_is_kept_until_cleared(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_dataplane(dataplane())
    assert (await store.get_dataplane("shop", "host-a")).last_error == ""
    rejected = await store.update_dataplane_status(
        "shop", "host-a", applied_version=3, last_seen=NOW + 1, cert_not_after=None,
        last_error="route orders: no such service",
    )
    assert rejected.last_error == "route orders: no such service"
    kept = await store.update_dataplane_status(
        "shop", "host-a", applied_version=3, last_seen=NOW + 2, cert_not_after=None
    )
    assert kept.last_error == "route orders: no such service" and kept.last_seen == NOW + 2
    assert await store.get_dataplane("shop", "host-a") == kept
    cleared = await store.update_dataplane_status(
        "shop", "host-a", applied_version=4, last_seen=NOW + 3, cert_not_after=None,
        last_error="",
    )
    assert cleared.last_error == ""
    again = msgspec.structs.replace(dataplane(), last_error="kept as written")
    assert await store.put_dataplane(again) == again
    assert await store.get_dataplane("shop", "host-a") == again


async def test_mesh_previous_ca_round_trips_and_is_a_change(store: Store) -> None:
    """CA rotation: the retiring CA's key is kept beside the new one, then dropped."""
    created = await store.create_mesh(mesh())
    assert created.previous_ca == b""
    before = await store.mesh_revision("shop")
    rotated = await store.update_mesh(
        msgspec.structs.replace(created, ca=b"\x00new-ca\xff", previous_ca=CA),
        expected_version=1,
    )
    assert (rotated.ca, rotated.previous_ca, rotated.version) == (b"\x00new-ca\xff", CA, 2)
    assert await store.get_mesh("shop") == rotated
    assert await store.list_meshes() == [rotated]
    assert await store.mesh_revision("shop") == before + 1
    finished = await store.update_mesh(msgspec.structs.replace(rotated, previous_ca=b""))
    assert (await store.get_mesh("shop")).previous_ca == b"" == finished.previous_ca


async def test_dataplane_cert_issuers_are_kept_until_reported(store: Store) -> None:
    await store.create_mesh(mesh())
    written = msgspec.structs.replace(dataplane(), cert_issuers=("a" * 64,))
    assert await store.put_dataplane(written) == written
    assert (await store.get_dataplane("shop", "host-a")).cert_issuers == ("a" * 64,)
    before = await store.mesh_revision("shop")
    kept = await store.update_dataplane_status(
        "shop", "host-a", applied_version=1, last_seen=NOW + 1, cert_not_after=None
    )
    assert kept.cert_issuers == ("a" * 64,)
    reported = await store.update_dataplane_status(
        "shop", "host-a", applied_version=1, last_seen=NOW + 2, cert_not_after=None,
        cert_issuers=["b" * 64, "c" * 64],
    )
    assert reported.cert_issuers == ("b" * 64, "c" * 64)
    assert await store.get_dataplane("shop", "host-a") == reported
    assert await store.list_dataplanes("shop") == [reported]
    assert await store.mesh_revision("shop") == before  # a heartbeat wakes nobody


async def test_a_silent_dataplane_marked_offline_is_a_change_and_so_is_its_return(
    store: Store,
) -> None:
    await store.create_mesh(mesh())
    await store.put_dataplane(dataplane("host-a"))
    await store.put_dataplane(dataplane("host-b", address="10.0.0.2"))
    await store.update_dataplane_status(
        "shop", "host-b", applied_version=1, last_seen=NOW + 50, cert_not_after=None
    )
    revision = await store.mesh_revision("shop")
    # Only what is still silent before seen_before is marked; unknown names are skipped.
    marked = await store.mark_dataplanes_offline(
        "shop", ["host-b", "host-a", "ghost"], seen_before=NOW + 40
    )
    assert marked == ["host-a"]
    assert await store.mesh_revision("shop") == revision + 1
    assert (await store.get_dataplane("shop", "host-a")).offline is True
    assert (await store.get_dataplane("shop", "host-b")).offline is False
    # Marking again changes nothing, and does not bump the revision.
    assert await store.mark_dataplanes_offline("shop", ["host-a"], seen_before=NOW + 40) == []
    assert await store.mark_dataplanes_offline("shop", [], seen_before=NOW + 40) == []
    assert await store.mesh_revision("shop") == revision + 1
    # Its next heartbeat brings it back: flag cleared, one more revision.
    back = await store.update_dataplane_status(
        "shop", "host-a", applied_version=2, last_seen=NOW + 60, cert_not_after=None
    )
    assert back.offline is False and back.last_seen == NOW + 60
    assert await store.get_dataplane("shop", "host-a") == back
    assert await store.mesh_revision("shop") == revision + 2
    # Heartbeats of a dataplane that is online still change nothing.
    await store.update_dataplane_status(
        "shop", "host-a", applied_version=2, last_seen=NOW + 70, cert_not_after=None
    )
    assert await store.mesh_revision("shop") == revision + 2
    # The flag is part of the record as written.
    flagged = msgspec.structs.replace(dataplane("host-c"), offline=True)
    assert await store.put_dataplane(flagged) == flagged
    assert await store.get_dataplane("shop", "host-c") == flagged


async def test_a_change_of_unhealthy_services_is_a_change_of_the_mesh(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_dataplane(dataplane())
    assert (await store.get_dataplane("shop", "host-a")).unhealthy == ()
    revision = await store.mesh_revision("shop")

    async def report(at: float, unhealthy: list[str] | None) -> DataplaneRecord:
        return await store.update_dataplane_status(
            "shop", "host-a", applied_version=1, last_seen=NOW + at, cert_not_after=None,
            unhealthy=unhealthy,
        )

    # Stored sorted, without repeats; the change bumps the revision once.
    sick = await report(1, ["web", "api", "web"])
    assert sick.unhealthy == ("api", "web") and sick.last_seen == NOW + 1
    assert await store.get_dataplane("shop", "host-a") == sick
    assert await store.list_dataplanes("shop") == [sick]
    assert await store.mesh_revision("shop") == revision + 1
    # The same set again (in another order), or None (an agent that does not say):
    # kept, and nobody is woken.
    assert (await report(2, ["web", "api"])).unhealthy == ("api", "web")
    assert (await report(3, None)).unhealthy == ("api", "web")
    assert await store.mesh_revision("shop") == revision + 1
    assert (await report(4, ["web"])).unhealthy == ("web",)
    assert await store.mesh_revision("shop") == revision + 2
    healthy = await report(5, [])
    assert healthy.unhealthy == () and healthy.last_seen == NOW + 5
    assert await store.mesh_revision("shop") == revision + 3
    # Coming back from offline with a change: one write, one revision.
    await store.mark_dataplanes_offline("shop", ["host-a"], seen_before=NOW + 10)
    assert await store.mesh_revision("shop") == revision + 4
    back = await report(11, ["api"])
    assert (back.offline, back.unhealthy) == (False, ("api",))
    assert await store.mesh_revision("shop") == revision + 5
    # The field is part of the record as written.
    written = msgspec.structs.replace(dataplane("host-c"), unhealthy=("web",))
    assert await store.put_dataplane(written) == written
    assert await store.get_dataplane("shop", "host-c") == written


async def test_a_health_change_wakes_the_long_polls(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_dataplane(dataplane("host-a"))
    revision = await store.mesh_revision("shop")
    seen: list[int] = []

    async def wait() -> None:
        seen.append(await store.wait_for_change("shop", revision, 30))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked(cushion=0.01)
        await store.update_dataplane_status(  # a heartbeat that changes nothing
            "shop", "host-a", applied_version=1, last_seen=NOW + 1, cert_not_after=None,
            unhealthy=[],
        )
        await trio.sleep(0.2)
        assert seen == []
        await store.update_dataplane_status(
            "shop", "host-a", applied_version=1, last_seen=NOW + 2, cert_not_after=None,
            unhealthy=["web"],
        )
        with trio.fail_after(5):  # woken, long before its 30 s timeout
            while not seen:
                await trio.sleep(0.01)
    assert seen == [revision + 1]


async def test_marking_offline_wakes_the_long_polls(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_dataplane(dataplane("host-a"))
    revision = await store.mesh_revision("shop")
    seen: list[int] = []

    async def wait(after: int) -> None:
        seen.append(await store.wait_for_change("shop", after, 30))

    for change in (
        lambda: store.mark_dataplanes_offline("shop", ["host-a"], seen_before=NOW + 1),
        lambda: store.update_dataplane_status(
            "shop", "host-a", applied_version=1, last_seen=NOW + 2, cert_not_after=None
        ),
    ):
        seen.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait, revision)
            await trio.testing.wait_all_tasks_blocked(cushion=0.01)
            assert seen == []
            await change()
            with trio.fail_after(5):  # woken, long before its 30 s timeout
                while not seen:
                    await trio.sleep(0.01)
        revision += 1
        assert seen == [revision]


# ---------------------------------------------------------------------------- tokens


async def test_token_create_list_delete(store: Store) -> None:
    await store.create_mesh(mesh())
    created = await store.create_token(token("tok-2", secret="two"))
    await store.create_token(token("tok-1", secret="one"))
    await store.create_token(
        token("admin-1", secret="adm", mesh=None, uses_left=None, expires_at=None)
    )
    assert [t.id for t in await store.list_tokens()] == ["admin-1", "tok-1", "tok-2"]
    assert [t.id for t in await store.list_tokens("shop")] == ["tok-1", "tok-2"]
    assert (await store.list_tokens("shop"))[1] == created
    await store.delete_token("tok-1")
    with pytest.raises(NotFound) as gone:
        await store.delete_token("tok-1")
    one_line_naming(gone.value, "token tok-1")
    assert [t.id for t in await store.list_tokens("shop")] == ["tok-2"]
    with pytest.raises(NotFound):
        await store.consume_token(token_digest("one"), NOW)


async def test_get_token_by_id(store: Store) -> None:
    await store.create_mesh(mesh())
    created = await store.create_token(token("tok-1", secret="one", uses_left=2))
    admin = await store.create_token(
        token("admin-1", secret="adm", mesh=None, uses_left=None, expires_at=None)
    )
    assert await store.get_token("tok-1") == created
    assert await store.get_token("admin-1") == admin
    await store.consume_token(token_digest("one"), NOW)
    assert (await store.get_token("tok-1")).uses_left == 1
    await store.consume_token(token_digest("one"), NOW)  # the last use deletes it
    with pytest.raises(NotFound) as used_up:
        await store.get_token("tok-1")
    one_line_naming(used_up.value, "token tok-1", "not found")
    with pytest.raises(NotFound):
        await store.get_token("never-issued")
    await store.create_token(token("t-exp", secret="exp", expires_at=NOW - 1))
    assert (await store.get_token("t-exp")).expires_at == NOW - 1  # until purged
    await store.delete_mesh("shop")
    with pytest.raises(NotFound):
        await store.get_token("t-exp")
    with pytest.raises(ValueError):
        await store.get_token("a/b")


async def test_token_ids_and_digests_are_unique(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.create_token(token("tok-1", secret="one"))
    with pytest.raises(Conflict) as same_id:
        await store.create_token(token("tok-1", secret="other"))
    one_line_naming(same_id.value, "token tok-1", "already exists")
    with pytest.raises(Conflict) as same_digest:
        await store.create_token(token("tok-9", secret="one"))
    one_line_naming(same_digest.value, token_digest("one")[:12])
    with pytest.raises(NotFound):
        await store.create_token(token("tok-3", secret="three", mesh="nope"))
    assert [t.id for t in await store.list_tokens()] == ["tok-1"]


async def test_consume_token_counts_down_then_it_is_gone(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.create_token(token(secret="multi", uses_left=2))
    first = await store.consume_token(token_digest("multi"), NOW)
    assert first.uses_left == 1
    assert (await store.list_tokens())[0].uses_left == 1
    last = await store.consume_token(token_digest("multi"), NOW)
    assert (last.id, last.uses_left) == ("tok-1", 0)
    assert await store.list_tokens() == []
    with pytest.raises(NotFound) as used_up:
        await store.consume_token(token_digest("multi"), NOW)
    one_line_naming(used_up.value, "expired or used up")
    assert token_digest("multi") not in str(used_up.value)  # a prefix names it; never more


async def test_consume_token_refuses_expired_and_unknown(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.create_token(token("t-exp", secret="exp", expires_at=NOW + 60, uses_left=5))
    await store.create_token(token("t-forever", secret="forever", uses_left=None, expires_at=None))
    with pytest.raises(NotFound):
        await store.consume_token(token_digest("exp"), NOW + 60)  # expires_at is exclusive
    assert (await store.consume_token(token_digest("exp"), NOW + 59)).uses_left == 4
    with pytest.raises(NotFound):
        await store.consume_token(token_digest("never-issued"), NOW)
    for _ in range(3):
        assert (await store.consume_token(token_digest("forever"), NOW + 10**6)).uses_left is None


async def test_concurrent_consumers_of_a_one_use_token_exactly_one_wins(
    backend: Backend, store: Store
) -> None:
    await store.create_mesh(mesh())
    await store.create_token(token(secret="once", uses_left=1))
    await store.create_token(token("tok-3", secret="thrice", uses_left=3))
    won: dict[str, list[int]] = {"once": [], "thrice": []}
    lost: dict[str, int] = {"once": 0, "thrice": 0}
    async with backend.open() as other:

        async def consume(handle: Store, secret: str) -> None:
            try:
                used = await handle.consume_token(token_digest(secret), NOW)
            except NotFound:
                lost[secret] += 1
            else:
                assert used.uses_left is not None
                won[secret].append(used.uses_left)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(consume, store if i % 2 else other, "once")
                nursery.start_soon(consume, other if i % 2 else store, "thrice")
    assert (won["once"], lost["once"]) == ([0], 7)
    assert (sorted(won["thrice"]), lost["thrice"]) == ([0, 1, 2], 5)
    assert await store.list_tokens() == []


async def test_delete_expired_tokens(store: Store) -> None:
    await store.create_mesh(mesh())
    await store.create_token(token("old", secret="old", expires_at=NOW - 1))
    await store.create_token(token("edge", secret="edge", expires_at=NOW))
    await store.create_token(token("fresh", secret="fresh", expires_at=NOW + 1))
    await store.create_token(token("forever", secret="forever", expires_at=None))
    assert await store.delete_expired_tokens(NOW) == 2
    assert [t.id for t in await store.list_tokens()] == ["forever", "fresh"]
    assert await store.delete_expired_tokens(NOW) == 0


# ---------------------------------------------------------------------------- audit


async def test_audit_is_listed_newest_first_per_mesh_and_limited(store: Store) -> None:
    entries = [
        AuditRecord(
            at=NOW + i,
            actor="alice",
            action="apply",
            mesh=("shop", "blog", None)[i % 3],
            target=f"policy p{i}",
            detail=f"#{i}",
        )
        for i in range(7)
    ]
    for entry in entries:
        await store.append_audit(entry)
    assert await store.list_audit() == entries[::-1]
    assert await store.list_audit(limit=2) == [entries[6], entries[5]]
    assert await store.list_audit("shop") == [entries[6], entries[3], entries[0]]
    assert await store.list_audit("blog", limit=1) == [entries[4]]
    assert await store.list_audit("nope") == []
    assert await store.list_audit(limit=0) == []


async def test_delete_audit_before_keeps_newer_entries_of_every_mesh(store: Store) -> None:
    # More than one Consul transaction's worth (32 entries), in two meshes and none.
    entries = [
        AuditRecord(
            at=NOW + i, actor="alice", action="apply", mesh=("shop", None)[i % 2],
            target=f"policy p{i}",
        )
        for i in range(40)
    ]
    for entry in entries:
        await store.append_audit(entry)
    assert await store.delete_audit_before(NOW + 35) == 35  # an entry at the cut stays
    assert await store.list_audit() == entries[:34:-1]
    assert await store.list_audit("shop") == [entries[38], entries[36]]
    assert await store.delete_audit_before(NOW + 35) == 0
    assert await store.delete_audit_before(NOW) == 0
    assert await store.delete_audit_before(NOW + 1000) == 5
    assert await store.list_audit() == []


async def test_concurrent_audit_deletions_count_each_entry_once(
    backend: Backend, store: Store
) -> None:
    for i in range(12):
        await store.append_audit(
            AuditRecord(at=NOW + i, actor="a", action="b", mesh="shop", target=f"t{i}")
        )
    counts: list[int] = []

    async def delete(handle: Store) -> None:
        counts.append(await handle.delete_audit_before(NOW + 10))

    async with backend.open() as other:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(delete, store)
                nursery.start_soon(delete, other)
    assert sum(counts) == 10
    assert [e.target for e in await store.list_audit()] == ["t11", "t10"]


# ---------------------------------------------------------------------------- revisions and long-polls


async def test_mesh_revision_counts_changes_to_that_mesh_only(store: Store) -> None:
    assert await store.mesh_revision("shop") == 0
    steps = [
        store.create_mesh(mesh("shop")),
        store.put_policy(policy("web")),
        store.apply_policies("shop", [policy("a"), policy("b")]),
        store.put_dataplane(dataplane()),
        store.delete_policy("shop", "TrafficRoute", "a"),
        store.delete_dataplane("shop", "host-a"),
        store.update_mesh(mesh("shop", spec=b"[]")),
        store.delete_mesh("shop"),
        store.create_mesh(mesh("shop")),
    ]
    for expected, step in enumerate(steps, start=1):
        await step
        assert await store.mesh_revision("shop") == expected
    # Not changes of the mesh: other meshes, tokens, audit, dataplane status.
    await store.create_mesh(mesh("blog"))
    await store.put_policy(policy("web", mesh="blog"))
    await store.create_token(token())
    await store.consume_token(token().digest, NOW)
    await store.append_audit(AuditRecord(at=NOW, actor="a", action="b", mesh="shop", target="c"))
    await store.put_dataplane(dataplane())
    await store.update_dataplane_status(
        "shop", "host-a", applied_version=1, last_seen=NOW, cert_not_after=None
    )
    assert await store.mesh_revision("shop") == len(steps) + 1
    assert await store.mesh_revision("blog") == 2


async def test_wait_for_change_returns_at_once_or_after_the_timeout(store: Store) -> None:
    await store.create_mesh(mesh())
    with trio.fail_after(2):
        assert await store.wait_for_change("shop", 0, 30) == 1
        assert await store.wait_for_change("shop", 5, 30) == 1  # a restored store went back
    start = trio.current_time()
    with trio.fail_after(5):
        assert await store.wait_for_change("shop", 1, 0.3) == 1
    assert trio.current_time() - start >= 0.3
    with trio.fail_after(5):
        assert await store.wait_for_change("never", 0, 0.1) == 0
        assert await store.wait_for_change("shop", 0, 0) == 1  # no time left: still reads


async def test_wait_for_change_wakes_on_a_change_through_this_or_another_handle(
    backend: Backend, store: Store
) -> None:
    await store.create_mesh(mesh())
    async with backend.open() as other:
        for writer, after in [(store, 1), (other, 2)]:
            seen: list[int] = []

            async def wait(after: int = after, seen: list[int] = seen) -> None:
                seen.append(await store.wait_for_change("shop", after, 30))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                # The waiter parked in its event wait / blocking query (the cushion is
                # shorter than the SQLite store's poll interval, which wakes it briefly).
                await trio.testing.wait_all_tasks_blocked(cushion=0.01)
                assert seen == []
                await writer.put_policy(policy("web"))
                with trio.fail_after(5):  # woken, long before its 30 s timeout
                    while not seen:
                        await trio.sleep(0.01)
            assert seen == [after + 1]


# ---------------------------------------------------------------------------- durability and input checks


async def test_data_survives_reopening(backend: Backend, store: Store) -> None:
    await store.create_mesh(mesh())
    await store.put_policy(policy("web"))
    await store.create_token(token(uses_left=3))
    await store.append_audit(
        AuditRecord(at=NOW, actor="alice", action="create", mesh="shop", target="mesh shop")
    )
    await store.aclose()
    async with backend.open() as reopened:
        assert await reopened.get_mesh("shop") == MeshRecord(
            name="shop", spec=SPEC, ca=CA, version=1, created_at=NOW
        )
        assert (await reopened.get_policy("shop", "TrafficRoute", "web")).version == 1
        assert (await reopened.consume_token(token().digest, NOW)).uses_left == 2
        assert len(await reopened.list_audit()) == 1
        assert await reopened.mesh_revision("shop") == 2


@pytest.mark.parametrize("bad", ["", "a/b", "tab\there", ".", "..", "x" * 254])
async def test_unusable_names_are_value_errors(store: Store, bad: str) -> None:
    with pytest.raises(ValueError):
        await store.create_mesh(mesh(bad))
    with pytest.raises(ValueError):
        await store.put_policy(policy(bad))
    with pytest.raises(ValueError):
        await store.put_policy(policy("web", kind=bad))
    with pytest.raises(ValueError):
        await store.put_dataplane(dataplane(bad))
    with pytest.raises(ValueError):
        await store.create_token(token(bad))


async def test_specs_must_be_json_and_digests_sha256(store: Store) -> None:
    with pytest.raises(ValueError, match="not JSON"):
        await store.create_mesh(mesh(spec=b"{not json"))
    await store.create_mesh(mesh())
    with pytest.raises(ValueError, match="not JSON"):
        await store.put_policy(
            PolicyRecord(mesh="shop", kind="K", name="n", spec=b"", updated_at=NOW)
        )
    with pytest.raises(ValueError, match="SHA-256"):
        await store.create_token(msgspec.structs.replace(token(), digest="s3cret"))
    with pytest.raises(ValueError, match="SHA-256"):
        await store.consume_token("s3cret", NOW)
    with pytest.raises(ValueError, match="uses_left"):
        await store.create_token(token(uses_left=0))


# ---------------------------------------------------------------------------- unavailability (one per store)


async def test_consul_store_unavailable_is_one_line_naming_the_address() -> None:
    address = f"http://127.0.0.1:{free_port()}"
    async with ConsulClient(address, timeout_seconds=2) as client:
        store = ConsulKvStore(client, "x/")
        with pytest.raises(StoreUnavailable) as down:
            await store.get_mesh("shop")
        one_line_naming(down.value, address, "unreachable")
        with pytest.raises(StoreUnavailable):
            await store.create_mesh(mesh())


async def test_sqlite_store_closed_is_unavailable(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path / "c.db")
    await store.aclose()
    await store.aclose()  # idempotent
    with pytest.raises(StoreUnavailable) as closed:
        await store.get_mesh("shop")
    one_line_naming(closed.value, "c.db", "closed")


async def test_consul_keeps_specs_readable_json(module_consul: ConsulProcess) -> None:
    async with ConsulClient(module_consul.address) as client:
        store = ConsulKvStore(client, "readable/")
        await store.create_mesh(mesh())
        await store.put_policy(policy("web"))
        _, entry = await client.kv_get("readable/policies/shop/TrafficRoute/web")
    assert entry is not None and entry.value is not None
    assert json.loads(entry.value)["spec"] == {"destination": "web", "weight": 1}


async def test_consul_reads_dataplanes_written_before_last_error(
    module_consul: ConsulProcess,
) -> None:
    async with ConsulClient(module_consul.address) as client:
        store = ConsulKvStore(client, "older-dataplanes/")
        await store.create_mesh(mesh())
        await store.put_dataplane(dataplane())
        key = "older-dataplanes/dataplanes/shop/host-a"
        _, entry = await client.kv_get(key)
        assert entry is not None and entry.value is not None
        document = json.loads(entry.value)
        del document["last_error"]
        await client.kv_put(key, json.dumps(document).encode())
        assert await store.get_dataplane("shop", "host-a") == dataplane()


async def test_consul_reads_meshes_and_dataplanes_written_before_ca_rotation(
    module_consul: ConsulProcess,
) -> None:
    async with ConsulClient(module_consul.address) as client:
        store = ConsulKvStore(client, "older-rotation/")
        created = await store.create_mesh(mesh())
        await store.put_dataplane(dataplane())
        for key, field in (
            ("older-rotation/meshes/shop", "previous_ca"),
            ("older-rotation/dataplanes/shop/host-a", "cert_issuers"),
        ):
            _, entry = await client.kv_get(key)
            assert entry is not None and entry.value is not None
            document = json.loads(entry.value)
            del document[field]
            await client.kv_put(key, json.dumps(document).encode())
        found = await store.get_mesh("shop")
        assert (found.ca, found.previous_ca, found.version) == (created.ca, b"", 1)
        assert (await store.get_dataplane("shop", "host-a")).cert_issuers == ()


async def test_a_rotation_stored_before_phases_reads_as_renewing(store: Store) -> None:
    """A mesh stored mid-rotation by a meshagent without rotation phases (its spec has no
    phase fields) keeps its meaning: the new CA signs, and the switch job leaves it be."""
    from meshagent.central.jobs import CaRotationSwitch
    from meshagent.central.meshes import decode_spec, new_mesh, signing_fingerprint, start_rotation
    from meshagent.pki.rotation import ca_fingerprint
    from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes

    seal = key_from_file_bytes(new_key_file_bytes())
    rotated = start_rotation(
        new_mesh("shop", mtls="strict", ca="builtin", seal_key=seal, now=1.0),
        ca="builtin", seal_key=seal, now=2.0,
    )
    spec = json.loads(rotated.spec)
    for key in ("rotation_phase", "bundle_revision", "switched_at"):
        del spec[key]
    stored = await store.create_mesh(
        msgspec.structs.replace(rotated, spec=json.dumps(spec).encode())
    )
    found = decode_spec(await store.get_mesh("shop"))
    assert found.rotation_phase == "renewing" and found.bundle_revision == 0
    assert signing_fingerprint(found) == ca_fingerprint(found.ca_cert)
    assert await CaRotationSwitch(store)(100.0) == 0
    assert (await store.get_mesh("shop")).version == stored.version
