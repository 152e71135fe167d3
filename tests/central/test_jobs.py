"""The leader's jobs: the pure orphan decision, the jobs against both stores, and the
loops (run while leading, stop at once when leadership goes, survive failures) under
trio's autojump clock."""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing

from meshagent.central.dataplanes import DataplaneSpec
from meshagent.central.jobs import (
    ORPHAN_GRACE_SECONDS,
    CaRotationSwitch,
    LeaderJob,
    OfflineSweep,
    SoleLeader,
    leader_jobs,
    orphan_node_tokens,
    purge_old_audit,
    purge_orphan_node_tokens,
    record_bundle_revision,
    run_job_once,
    run_leader_jobs,
)
from meshagent.central.meshes import decode_spec as decode_mesh_spec
from meshagent.central.meshes import new_mesh, start_rotation
from meshagent.central.store import (
    AuditRecord,
    DataplaneRecord,
    MeshRecord,
    Store,
    StoreUnavailable,
    TokenKind,
    TokenRecord,
    token_digest,
)
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes
from tests.central.conftest import Backend

NOW = 1_700_000_000.0
OLD = NOW - ORPHAN_GRACE_SECONDS


def token(token_id: str, *, kind: TokenKind = "node", mesh: str = "shop", created_at: float = OLD) -> TokenRecord:
    return TokenRecord(
        id=token_id, mesh=mesh, kind=kind, digest=token_digest(token_id),
        services=("web",), expires_at=None, uses_left=None if kind == "node" else 1,
        created_at=created_at,
    )


def dataplane(name: str, *, names: str | None, mesh: str = "shop") -> DataplaneRecord:
    spec = (
        msgspec.json.encode(DataplaneSpec(node_token_id=names)) if names is not None
        else b'{"inbound": []}'  # JSON, but not a DataplaneSpec
    )
    return DataplaneRecord(
        mesh=mesh, name=name, node=f"host-{name}", address="10.0.0.1", services=("web",),
        spec=spec, last_seen=NOW,
    )


# ---------------------------------------------------------------------------- the pure decision


def ids(tokens: list[TokenRecord]) -> list[str]:
    return [t.id for t in tokens]


def test_a_node_credential_no_dataplane_names_is_an_orphan() -> None:
    tokens = [token("n1"), token("n2"), token("n3")]
    dataplanes = [dataplane("a", names="n1"), dataplane("b", names="n3")]
    assert ids(orphan_node_tokens(tokens, dataplanes, now=NOW)) == ["n2"]


def test_join_and_admin_tokens_are_never_orphans() -> None:
    tokens = [token("j1", kind="join"), token("a1", kind="admin"), token("n1")]
    assert ids(orphan_node_tokens(tokens, [], now=NOW)) == ["n1"]


def test_a_young_credential_may_belong_to_a_join_under_way() -> None:
    tokens = [token("edge", created_at=OLD), token("young", created_at=OLD + 1)]
    assert ids(orphan_node_tokens(tokens, [], now=NOW)) == ["edge"]
    assert ids(orphan_node_tokens(tokens, [], now=NOW, grace_seconds=0)) == ["edge", "young"]


def test_an_unreadable_dataplane_keeps_every_credential_of_its_mesh() -> None:
    tokens = [token("s1", mesh="shop"), token("b1", mesh="blog")]
    dataplanes = [dataplane("x", names=None, mesh="shop")]
    assert ids(orphan_node_tokens(tokens, dataplanes, now=NOW)) == ["b1"]


def test_a_dataplane_of_another_mesh_still_names_its_credential() -> None:
    # Token ids are unique across meshes: a name is a name wherever it is.
    assert orphan_node_tokens([token("n1", mesh="shop")], [dataplane("a", names="n1", mesh="blog")], now=NOW) == []


# ---------------------------------------------------------------------------- the jobs, on both stores


async def test_purge_orphan_node_tokens(store: Store) -> None:
    for name in ("shop", "blog"):
        await store.create_mesh(MeshRecord(name=name, spec=b"{}", ca=b"ca", created_at=NOW))
    for record in (
        token("named"), token("orphan"), token("young", created_at=NOW - 5),
        token("join", kind="join"), token("blog-orphan", mesh="blog"),
    ):
        await store.create_token(record)
    await store.put_dataplane(dataplane("web-1", names="named"))
    await store.put_dataplane(dataplane("odd", names=None, mesh="blog"))
    assert await purge_orphan_node_tokens(store, NOW) == 1
    assert [t.id for t in await store.list_tokens()] == ["blog-orphan", "join", "named", "young"]
    assert await purge_orphan_node_tokens(store, NOW) == 0
    assert await purge_orphan_node_tokens(store, NOW + ORPHAN_GRACE_SECONDS) == 1  # "young" now
    assert [t.id for t in await store.list_tokens()] == ["blog-orphan", "join", "named"]


async def test_leader_jobs_purge_and_say_so(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    await store.create_mesh(MeshRecord(name="shop", spec=b"{}", ca=b"ca", created_at=NOW))
    expired = msgspec.structs.replace(token("j1", kind="join"), expires_at=NOW - 1)
    await store.create_token(expired)
    await store.create_token(token("n1"))
    for at in (NOW - 100 * 86400, NOW - 91 * 86400, NOW - 1):
        await store.append_audit(AuditRecord(at=at, actor="a", action="b", mesh="shop", target="c"))
    jobs = leader_jobs(store, audit_retention_seconds=90 * 86400)
    assert [await run_job_once(job, clock=lambda: NOW) for job in jobs] == [1, 1, 2, 0, 0]
    assert await store.list_tokens() == []
    assert [e.at for e in await store.list_audit()] == [NOW - 1]
    lines = capsys.readouterr().err.splitlines()
    assert sum("expired tokens purged" in line and "count=1" in line for line in lines) == 1
    assert sum("node credentials no dataplane names purged" in line for line in lines) == 1
    assert sum("audit entries past retention purged" in line and "count=2" in line for line in lines) == 1
    # Nothing left to do: nothing said.
    assert [await run_job_once(job, clock=lambda: NOW) for job in jobs] == [0, 0, 0, 0, 0]
    assert "purged" not in capsys.readouterr().err


async def test_purge_old_audit_keeps_the_retention_window(store: Store) -> None:
    await store.append_audit(AuditRecord(at=NOW - 11, actor="a", action="b", mesh=None, target="c"))
    await store.append_audit(AuditRecord(at=NOW - 10, actor="a", action="b", mesh=None, target="d"))
    assert await purge_old_audit(store, NOW, retention_seconds=10) == 1
    assert [e.target for e in await store.list_audit()] == ["d"]


# ---------------------------------------------------------------------------- running them


class Switch:
    """A Leadership a test turns on and off."""

    def __init__(self, leader: bool = False) -> None:
        self._leader = leader
        self._changed = trio.Event()

    @property
    def is_leader(self) -> bool:
        return self._leader

    def set(self, leader: bool) -> None:
        self._leader = leader
        self._changed.set()
        self._changed = trio.Event()

    async def wait_leader(self) -> None:
        while not self._leader:
            await self._changed.wait()

    async def wait_not_leader(self) -> None:
        while self._leader:
            await self._changed.wait()


class Recorder:
    """A job that records when it ran; it can fail or hang on request."""

    def __init__(self) -> None:
        self.runs: list[float] = []
        self.cancelled_at: list[float] = []
        self.fail_next: BaseException | None = None
        self.hang = False

    async def __call__(self, now: float) -> int:
        self.runs.append(trio.current_time())
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        if self.hang:
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled_at.append(trio.current_time())
        await trio.lowlevel.checkpoint()
        return 0


async def test_jobs_run_only_while_leading_and_stop_at_once(autojump_clock: trio.testing.MockClock) -> None:
    switch = Switch()
    quick, slow = Recorder(), Recorder()
    jobs = [LeaderJob("quick", "quick purged", quick), LeaderJob("slow", "slow purged", slow)]
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_leader_jobs(switch, jobs, interval_seconds=10, task_status=task_status))
        await trio.sleep(50)
        assert quick.runs == [] and slow.runs == []  # not the leader: nothing runs
        switch.set(True)
        await trio.sleep(25)  # t = 75
        assert quick.runs == [50, 60, 70]
        slow.hang = True
        await trio.sleep(10)  # t = 85: slow hangs in its run from t = 80
        switch.set(False)
        await trio.testing.wait_all_tasks_blocked()
        assert slow.cancelled_at == [85]  # stopped the moment leadership went
        await trio.sleep(100)
        assert quick.runs == [50, 60, 70, 80]
        slow.hang = False
        switch.set(True)  # t = 185: leader again, the jobs start over at once
        await trio.sleep(5)
        assert quick.runs[-1] == slow.runs[-1] == 185
        nursery.cancel_scope.cancel()


async def test_a_failing_run_is_one_line_and_the_job_goes_on(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    job = Recorder()
    job.fail_next = StoreUnavailable("consul store meshagent/: consul at http://127.0.0.1:1 unreachable")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_leader_jobs(SoleLeader(), [LeaderJob("tokens", "purged", job)], interval_seconds=10, task_status=task_status))
        await trio.sleep(15)
        job.fail_next = RuntimeError("a bug")
        await trio.sleep(10)
        assert job.runs == [0, 10, 20]
        nursery.cancel_scope.cancel()
    failed = [line for line in capsys.readouterr().err.splitlines() if "leader job failed" in line]
    assert len(failed) == 2
    assert "job=tokens" in failed[0] and "127.0.0.1:1 unreachable" in failed[0]
    assert "RuntimeError: a bug" in failed[1]


async def test_a_run_that_hangs_is_cut_short(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    job = Recorder()
    job.hang = True
    assert await run_job_once(LeaderJob("tokens", "purged", job), timeout_seconds=30) is None
    assert job.cancelled_at == [30]
    assert "leader job timed out" in capsys.readouterr().err


# ---------------------------------------------------------------------------- offline dataplanes


async def test_the_sweep_marks_silent_dataplanes_once_it_has_watched_long_enough(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    await store.create_mesh(MeshRecord(name="shop", spec=b"{}", ca=b"ca", created_at=NOW))
    await store.create_mesh(MeshRecord(name="blog", spec=b"{}", ca=b"ca", created_at=NOW))
    for record in (dataplane("a", names="t1"), dataplane("b", names="t2"),
                   dataplane("c", names="t3", mesh="blog")):
        await store.put_dataplane(record)
    sweep = OfflineSweep(store, heartbeat_seconds=2.0)  # online for 6 s, a sweep every 1 s
    assert (sweep.within, sweep.interval_seconds) == (6.0, 1.0)
    revision = await store.mesh_revision("shop")
    # Just started: every dataplane is silent (the central agent was down, say), but
    # the sweep has not watched for the online window yet, so nothing is marked.
    t = NOW + 100
    for step in range(6):
        assert await sweep(t + step) == 0
    assert await store.mesh_revision("shop") == revision
    # "b" reports meanwhile; after six seconds of watching, "a" and "c" are marked.
    await store.update_dataplane_status("shop", "b", applied_version=1, last_seen=t + 5,
                                        cert_not_after=None)
    assert await sweep(t + 6) == 2
    assert [d.name for d in await store.list_dataplanes("shop") if d.offline] == ["a"]
    assert [d.offline for d in await store.list_dataplanes("blog")] == [True]
    assert await store.mesh_revision("shop") == revision + 1
    assert await sweep(t + 7) == 0  # marked already: no write
    assert await store.mesh_revision("shop") == revision + 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "left the built-in" in line]
    assert len(lines) == 2 and any("mesh=shop" in line and "dataplanes=a" in line for line in lines)
    # A gap of more than three intervals (lost leadership, a stalled store): watch again.
    assert await sweep(t + 20) == 0
    await store.update_dataplane_status("shop", "a", applied_version=1, last_seen=t + 20,
                                        cert_not_after=None)
    for later in (22, 24, 25.5):  # "b" is silent, but the new watch is not 6 s old
        assert await sweep(t + later) == 0
    assert await sweep(t + 26) == 1  # "b" ("a" reported at t + 20, so is online)
    assert [d.name for d in await store.list_dataplanes("shop") if d.offline] == ["b"]


async def test_the_sweep_runs_every_half_heartbeat_while_leading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[float] = []

    async def job(now: float) -> int:
        calls.append(trio.current_time())
        return 0

    sweep = LeaderJob("offline dataplanes", "", job, interval_seconds=0.5)
    other = LeaderJob("tokens", "purged", job)
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: run_leader_jobs(
            SoleLeader(), [sweep, other], interval_seconds=10, task_status=task_status
        ))
        await trio.sleep(2.9)
        nursery.cancel_scope.cancel()
    # The sweep at 0, 0.5 ... 2.5 (6 runs); the other job once, at 0.
    assert len(calls) == 7


# ---------------------------------------------------------------------------- the CA rotation switch


async def test_the_ca_switch_waits_for_the_bundle_and_happens_once_across_replicas(
    backend: Backend, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    seal = key_from_file_bytes(new_key_file_bytes())
    mesh = await store.create_mesh(new_mesh("shop", mtls="strict", ca="builtin", seal_key=seal, now=NOW))
    for record in (dataplane("a", names="t1"), dataplane("b", names="t2")):
        await store.put_dataplane(record)
    before = await store.mesh_revision("shop")
    rotating = await store.update_mesh(
        start_rotation(mesh, ca="builtin", seal_key=seal, now=NOW), expected_version=mesh.version
    )
    recorded = await record_bundle_revision(store, rotating)
    revision = decode_mesh_spec(recorded).bundle_revision
    assert revision > before and await record_bundle_revision(store, recorded) == recorded
    for name, applied in (("a", revision), ("b", revision - 1)):
        await store.update_dataplane_status("shop", name, applied_version=applied,
                                            last_seen=NOW + 1, cert_not_after=None)
    async with backend.open() as replica:
        jobs = [CaRotationSwitch(s, heartbeat_seconds=2.0, timeout_seconds=60.0)
                for s in (store, replica)]
        assert [await job(NOW + 2) for job in jobs] == [0, 0]  # "b" has not applied it
        assert decode_mesh_spec(await store.get_mesh("shop")).rotation_phase == "distributing"
        await store.update_dataplane_status("shop", "b", applied_version=revision + 1,
                                            last_seen=NOW + 3, cert_not_after=None)
        # Both replicas read the same record; only one write can win.
        read = await replica.get_mesh("shop")
        assert [await job.switch_one(read, NOW + 4) for job in jobs] == [True, False]
        assert [await job(NOW + 5) for job in jobs] == [0, 0]
    switched = decode_mesh_spec(await store.get_mesh("shop"))
    assert switched.rotation_phase == "renewing" and switched.switched_at == NOW + 4
    entries = [e for e in await store.list_audit("shop") if e.action == "mesh.ca_rotation.switch"]
    assert len(entries) == 1 and entries[0].actor == "central"
    lines = [line for line in capsys.readouterr().err.splitlines() if "the new CA signs" in line]
    assert len(lines) == 1 and "level=info" in lines[0]


async def test_the_ca_switch_times_out_with_a_warning_naming_who_lags(
    store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    seal = key_from_file_bytes(new_key_file_bytes())
    mesh = await store.create_mesh(new_mesh("shop", mtls="strict", ca="builtin", seal_key=seal, now=NOW))
    await store.put_dataplane(dataplane("a", names="t1"))
    await store.update_mesh(
        start_rotation(mesh, ca="builtin", seal_key=seal, now=NOW), expected_version=mesh.version
    )
    job = CaRotationSwitch(store, heartbeat_seconds=10.0, timeout_seconds=60.0)
    for t in (0, 20, 40, 59):  # "a" stays online on its old config
        await store.update_dataplane_status("shop", "a", applied_version=1, last_seen=NOW + t,
                                            cert_not_after=None)
        assert await job(NOW + t) == 0
    assert decode_mesh_spec(await store.get_mesh("shop")).bundle_revision > 0  # recorded
    assert await job(NOW + 60) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if "level=warning" in line]
    assert len(lines) == 1 and "dataplanes=a" in lines[0] and "timeout_seconds=60" in lines[0]
    entry = (await store.list_audit("shop"))[0]
    assert entry.action == "mesh.ca_rotation.switch" and entry.detail.endswith(
        "without the new bundle: a"
    )
