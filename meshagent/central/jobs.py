"""The jobs only the leader runs: housekeeping of the store that must happen once, not
once per replica.

Theory of operation:

* Replicas on one Consul elect a leader (``central/election.py``); a central agent on
  SQLite is the only process on its file, so it is always the leader (``SoleLeader``).
  ``run_leader_jobs`` waits for leadership, then runs every job in a nursery that is
  cancelled as soon as leadership is lost, and waits for leadership again.
* Each job is a loop: run once at once, then every ``interval_seconds`` (measured from
  the start of a run, so a slow run does not drift the schedule). A run is bounded by
  ``RUN_TIMEOUT_SECONDS``. A run that fails (the store unreachable, a bug) is one log
  line and is tried again next interval: a job never takes the process down.
* Every job is idempotent and its writes are conditional in the store, so a run cut
  short by a lost leadership, or overlapping with the next leader's first run, does no
  harm: what one deleted, the other no longer finds.
* A run that removed something says how much (one info line per job); a run that
  found nothing to do is quiet.

The jobs:

* ``purge_expired_tokens``: join and admin tokens past ``expires_at``.
* ``purge_old_audit``: audit entries older than ``audit_retention``.
* ``purge_orphan_node_tokens``: node credentials that no dataplane record names any
  more (``orphan_node_tokens`` is the pure decision). A join stores the credential a
  moment before the dataplane record that names it, so credentials younger than
  ``ORPHAN_GRACE_SECONDS`` are never orphans.
* ``OfflineSweep`` (every half heartbeat, not every ``leader_jobs_interval``): marks
  offline the dataplanes silent for three heartbeats (``silent_dataplanes``, the rule
  ``meshagent get dataplanes`` shows), which takes their endpoints out of the
  built-in catalog and wakes the mesh's long polls (a revision step). Only the leader
  writes it, so replicas that all see a dataplane go silent do not all write; a
  dataplane comes back with its next heartbeat, through whichever replica receives it
  (that write was going to happen anyway). A sweep marks nothing until it has been
  running without a gap for the online window: after a start or a takeover it cannot
  tell a silent dataplane from one whose heartbeats had nowhere to go (every central
  agent was down), and emptying the catalog of a whole mesh at once is worse than a
  late removal.
* ``CaRotationSwitch`` (every half heartbeat): for each mesh distributing a new CA
  (``meshes.switch_decision``), records the revision from which configs carry the new
  bundle if the start did not (``record_bundle_revision``), then switches the signer
  to the new CA once every online dataplane has applied it, or once
  ``ca_rotation_switch_timeout`` has passed since the start (a warning names the
  dataplanes that had not). Both writes are conditional on the mesh record's version:
  a replica that lost the race, or a rotation finished meanwhile, writes nothing. The
  switch is audited as ``mesh.ca_rotation.switch`` by actor ``central``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol

import msgspec
import trio

from meshagent.central.dataplanes import (
    HEARTBEAT_SECONDS,
    decode_spec,
    is_online,
    online_window,
    silent_dataplanes,
)
from meshagent.central.meshes import (
    SWITCH_TIMEOUT_SECONDS,
    switch_decision,
    switch_signer,
    with_bundle_revision,
)
from meshagent.central.meshes import (
    decode_spec as decode_mesh_spec,
)
from meshagent.central.store import (
    AuditRecord,
    Conflict,
    DataplaneRecord,
    MeshRecord,
    NotFound,
    Store,
    StoreError,
    TokenRecord,
)
from meshagent.log import get_logger
from meshagent.pki.rotation import ca_fingerprint, short

log = get_logger("central.jobs")

# A run that takes longer than this is cut short and tried again next interval.
RUN_TIMEOUT_SECONDS: Final = 300.0
# A node credential this young may belong to a join whose dataplane record is not
# stored yet; it also absorbs clock differences between replicas (``created_at`` is the
# joining replica's clock, ``now`` the leader's).
ORPHAN_GRACE_SECONDS: Final = 3600.0


class Leadership(Protocol):
    """What the jobs need of a leader election (``LeaderElection`` has it)."""

    @property
    def is_leader(self) -> bool: ...

    async def wait_leader(self) -> None: ...

    async def wait_not_leader(self) -> None: ...


class SoleLeader:
    """Leadership of the only process on a store (SQLite): always the leader."""

    @property
    def is_leader(self) -> bool:
        return True

    async def wait_leader(self) -> None:
        """Returns at once. Cancel point."""
        await trio.lowlevel.checkpoint()

    async def wait_not_leader(self) -> None:
        """Never returns: this process never loses leadership. Cancel point."""
        await trio.sleep_forever()


@dataclass(frozen=True, slots=True)
class LeaderJob:
    """One job: ``run(now)`` does it once and returns how many records it removed.

    ``name`` names the job in logs; ``removed`` is the log event of a run that removed
    something (e.g. "expired tokens purged"; "" for a job that logs its own lines).
    ``interval_seconds``: its own interval; None, central.toml's ``leader_jobs_interval``.
    """

    name: str
    removed: str
    run: Callable[[float], Awaitable[int]]
    interval_seconds: float | None = None


# ---------------------------------------------------------------------------- decisions (pure)


def orphan_node_tokens(
    tokens: Iterable[TokenRecord],
    dataplanes: Iterable[DataplaneRecord],
    *,
    now: float,
    grace_seconds: float = ORPHAN_GRACE_SECONDS,
) -> list[TokenRecord]:
    """The node credentials no dataplane names, created ``grace_seconds`` before ``now``
    or earlier. Pure.

    Args:
        tokens: tokens of any kind (only kind "node" can be orphans).
        dataplanes: every dataplane of the meshes the tokens belong to. One whose spec
            cannot be read might name any credential of its mesh, so that mesh's
            credentials are all kept.

    Returns:
        The orphans, in the order given.
    """
    named: set[str] = set()
    unreadable_meshes: set[str] = set()
    for record in dataplanes:
        try:
            named.add(decode_spec(record).node_token_id)
        except msgspec.DecodeError:
            unreadable_meshes.add(record.mesh)
    return [
        token
        for token in tokens
        if token.kind == "node"
        and token.id not in named
        and token.mesh not in unreadable_meshes
        and token.created_at <= now - grace_seconds
    ]


# ---------------------------------------------------------------------------- the jobs


async def purge_expired_tokens(store: Store, now: float) -> int:
    """Delete tokens that expired by ``now``; how many. Cancel point. Raises StoreError."""
    return await store.delete_expired_tokens(now)


async def purge_old_audit(store: Store, now: float, *, retention_seconds: float) -> int:
    """Delete audit entries older than ``now - retention_seconds``; how many. Cancel point.

    Raises:
        StoreError.
    """
    return await store.delete_audit_before(now - retention_seconds)


async def purge_orphan_node_tokens(
    store: Store, now: float, *, grace_seconds: float = ORPHAN_GRACE_SECONDS
) -> int:
    """Delete node credentials no dataplane names (see ``orphan_node_tokens``); how many.
    Cancel point.

    Tokens are read before dataplanes: a credential whose dataplane was stored before the
    dataplanes are read is seen as named.

    Raises:
        StoreError.
    """
    tokens = [t for t in await store.list_tokens() if t.kind == "node"]
    if not tokens:
        return 0
    dataplanes: list[DataplaneRecord] = []
    for mesh in sorted({t.mesh for t in tokens if t.mesh is not None}):
        dataplanes.extend(await store.list_dataplanes(mesh))
    deleted = 0
    for token in orphan_node_tokens(tokens, dataplanes, now=now, grace_seconds=grace_seconds):
        try:
            await store.delete_token(token.id)
        except NotFound:  # deleted meanwhile (its dataplane was deleted or joined again)
            continue
        deleted += 1
    return deleted


class OfflineSweep:
    """The leader job that marks silent dataplanes offline (see the module docstring).

    Call it with the time now, every ``interval_seconds``; it returns how many it marked.
    A call later than ``GAP_INTERVALS`` intervals after the previous one (the first
    call, a new leadership, a stalled store) starts the watch again: nothing is marked
    until the watch has lasted the online window.
    """

    GAP_INTERVALS: Final = 3

    def __init__(self, store: Store, *, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> None:
        self.store = store
        self.within = online_window(heartbeat_seconds)
        self.interval_seconds = heartbeat_seconds / 2
        self._watching_since: float | None = None
        self._last_call: float | None = None

    async def __call__(self, now: float) -> int:
        """One sweep over every mesh. Cancel point. Raises StoreError."""
        last, self._last_call = self._last_call, now
        if last is None or now - last > self.GAP_INTERVALS * self.interval_seconds:
            self._watching_since = now
        assert self._watching_since is not None
        if now - self._watching_since < self.within:
            return 0
        marked = 0
        for mesh in await self.store.list_meshes():
            silent = silent_dataplanes(
                await self.store.list_dataplanes(mesh.name), now=now, within=self.within
            )
            if not silent:
                continue
            names = await self.store.mark_dataplanes_offline(
                mesh.name, silent, seen_before=now - self.within
            )
            if names:
                log.info(
                    "dataplanes offline: their endpoints left the built-in catalog",
                    mesh=mesh.name,
                    dataplanes=",".join(names),
                    silent_seconds=self.within,
                )
            marked += len(names)
        return marked


# The actor of what the central agent does by itself, in the audit trail.
CENTRAL_ACTOR: Final = "central"


async def record_bundle_revision(store: Store, record: MeshRecord) -> MeshRecord:
    """Record, on a mesh distributing a new CA, the revision from which its configs
    carry the new bundle: the mesh revision read now, after ``record`` was stored (a
    config's version is the revision it was read at or an older one, never a newer:
    see ``dataplane_api.get_config``). Conditional on ``record``'s version. Returns the
    record as stored (``record`` itself when nothing was written, or another writer
    came first). Cancel point. Raises StoreError (not Conflict)."""
    revision = await store.mesh_revision(record.name)
    recorded = with_bundle_revision(record, revision)
    if recorded is None:
        return record
    try:
        return await store.update_mesh(recorded, expected_version=record.version)
    except (Conflict, NotFound):
        return record


class CaRotationSwitch:
    """The leader job that switches a rotating mesh's signer to the new CA (see the
    module docstring). Call it with the time now; it returns how many meshes it switched.
    """

    def __init__(
        self,
        store: Store,
        *,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        timeout_seconds: float = SWITCH_TIMEOUT_SECONDS,
    ) -> None:
        self.store = store
        self.within = online_window(heartbeat_seconds)
        self.interval_seconds = heartbeat_seconds / 2
        self.timeout_seconds = timeout_seconds

    async def __call__(self, now: float) -> int:
        """One pass over every mesh. Cancel point. Raises StoreError."""
        switched = 0
        for mesh in await self.store.list_meshes():
            try:
                rotating = decode_mesh_spec(mesh).rotation_phase == "distributing"
            except msgspec.DecodeError:  # not a mesh this version can read: not ours
                continue
            if rotating and await self.switch_one(mesh, now):
                switched += 1
        return switched

    async def switch_one(self, record: MeshRecord, now: float) -> bool:
        """Switch ``record``'s signer if it is time; True when this call did."""
        if with_bundle_revision(record, 1) is not None:  # distributing, not recorded
            record = await record_bundle_revision(self.store, record)
        dataplanes = await self.store.list_dataplanes(record.name)
        decision = switch_decision(
            record,
            dataplanes,
            is_online=lambda d: is_online(d, now, within=self.within),
            now=now,
            timeout_seconds=self.timeout_seconds,
        )
        if decision is None or not decision.switch:
            return False
        try:
            stored = await self.store.update_mesh(
                switch_signer(record, now=now), expected_version=record.version
            )
        except (Conflict, NotFound):  # changed meanwhile (finished, or another leader)
            return False
        new_ca = ca_fingerprint(decode_mesh_spec(stored).ca_cert)
        if decision.timed_out:
            waiting = ",".join(decision.waiting)
            detail = (
                f"phase=renewing new={new_ca} signs; timed out after "
                f"{self.timeout_seconds:g}s; without the new bundle: {waiting}"
            )
            log.warning(
                "CA rotation: the new CA signs although some online dataplanes have not "
                "applied the new trust bundle; they refuse the others' new certificates "
                "until they do",
                mesh=record.name,
                dataplanes=waiting,
                timeout_seconds=self.timeout_seconds,
            )
        else:
            detail = f"phase=renewing new={new_ca} signs; every online dataplane has the new bundle"
            log.info(
                "CA rotation: every online dataplane has the new trust bundle; the new CA signs",
                mesh=record.name,
                new_ca=short(new_ca),
            )
        await self.store.append_audit(
            AuditRecord(
                at=now,
                actor=CENTRAL_ACTOR,
                action="mesh.ca_rotation.switch",
                mesh=record.name,
                target=f"mesh {record.name}",
                detail=detail,
            )
        )
        return True


def leader_jobs(
    store: Store,
    *,
    audit_retention_seconds: float,
    heartbeat_seconds: float = HEARTBEAT_SECONDS,
    ca_switch_timeout_seconds: float = SWITCH_TIMEOUT_SECONDS,
) -> list[LeaderJob]:
    """The central agent's leader jobs over ``store``."""
    sweep = OfflineSweep(store, heartbeat_seconds=heartbeat_seconds)
    switch = CaRotationSwitch(
        store, heartbeat_seconds=heartbeat_seconds, timeout_seconds=ca_switch_timeout_seconds
    )
    return [
        LeaderJob("expired tokens", "expired tokens purged", partial(purge_expired_tokens, store)),
        LeaderJob(
            "orphan node credentials",
            "node credentials no dataplane names purged",
            partial(purge_orphan_node_tokens, store),
        ),
        LeaderJob(
            "audit retention",
            "audit entries past retention purged",
            partial(purge_old_audit, store, retention_seconds=audit_retention_seconds),
        ),
        LeaderJob("offline dataplanes", "", sweep, interval_seconds=sweep.interval_seconds),
        LeaderJob("CA rotation switch", "", switch, interval_seconds=switch.interval_seconds),
    ]


# ---------------------------------------------------------------------------- running them


async def run_job_once(
    job: LeaderJob,
    *,
    clock: Callable[[], float] = time.time,
    timeout_seconds: float = RUN_TIMEOUT_SECONDS,
) -> int | None:
    """Run ``job`` once within ``timeout_seconds``; log what it removed or why it failed.
    Cancel point.

    Returns:
        How many records it removed; None when it failed or timed out (logged).
    """
    removed: int | None = None
    with trio.move_on_after(timeout_seconds) as scope:
        try:
            removed = await job.run(clock())
        except Exception as exc:  # one failure must not stop the job, nor the process
            error = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
            log.warning("leader job failed; retried next interval", job=job.name, error=error)
            return None
    if scope.cancelled_caught:
        log.warning(
            "leader job timed out; retried next interval",
            job=job.name,
            timeout_seconds=timeout_seconds,
        )
        return None
    if removed and job.removed:
        log.info(job.removed, job=job.name, count=removed)
    return removed


async def run_job_forever(
    job: LeaderJob,
    *,
    interval_seconds: float,
    clock: Callable[[], float] = time.time,
    timeout_seconds: float = RUN_TIMEOUT_SECONDS,
) -> None:
    """Run ``job`` now and then every ``interval_seconds``, until cancelled. Cancel point."""
    while True:
        started = trio.current_time()
        await run_job_once(job, clock=clock, timeout_seconds=timeout_seconds)
        await trio.sleep_until(started + interval_seconds)


async def run_leader_jobs(
    leadership: Leadership,
    jobs: Sequence[LeaderJob],
    *,
    interval_seconds: float,
    clock: Callable[[], float] = time.time,
    timeout_seconds: float = RUN_TIMEOUT_SECONDS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``jobs`` while ``leadership`` says we lead; stop them the moment it ends.
    ``started()`` at once. Cancel point; never returns.

    Args:
        interval_seconds: the time between two starts of a job (central.toml
            ``leader_jobs_interval``).
        clock: wall-clock seconds since the epoch (the store's time).
    """
    task_status.started()
    names = [job.name for job in jobs]
    while True:
        await leadership.wait_leader()
        log.info("leader jobs running", jobs=",".join(names), interval_seconds=interval_seconds)
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(
                    partial(
                        run_job_forever,
                        job,
                        interval_seconds=job.interval_seconds or interval_seconds,
                        clock=clock,
                        timeout_seconds=timeout_seconds,
                    )
                )
            await leadership.wait_not_leader()
            nursery.cancel_scope.cancel()
        log.info("leader jobs stopped: not the leader any more")


__all__ = [
    "CENTRAL_ACTOR",
    "ORPHAN_GRACE_SECONDS",
    "RUN_TIMEOUT_SECONDS",
    "CaRotationSwitch",
    "LeaderJob",
    "Leadership",
    "OfflineSweep",
    "SoleLeader",
    "leader_jobs",
    "orphan_node_tokens",
    "purge_expired_tokens",
    "purge_old_audit",
    "purge_orphan_node_tokens",
    "record_bundle_revision",
    "run_job_forever",
    "run_job_once",
    "run_leader_jobs",
]
