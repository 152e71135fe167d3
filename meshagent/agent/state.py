"""The last good snapshot, kept on disk so an agent restarted during a Consul outage
still knows where its upstreams are."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import trio

from meshagent.agent.watch import SnapshotWatch
from meshagent.log import get_logger
from meshagent.snapshot import codec
from meshagent.snapshot.model import Snapshot

log = get_logger("state")

SNAPSHOT_FILE = "snapshot.json"


def load_cached_endpoints(state_dir: Path, fresh: Snapshot) -> Snapshot:
    """``fresh`` with the endpoints of services discovered last time (same mesh only).

    A missing, unreadable or undecodable cache is logged and ignored: it is an optimisation.
    """
    path = state_dir / SNAPSHOT_FILE
    try:
        cached = codec.decode(path.read_bytes())
    except FileNotFoundError:
        return fresh
    except (OSError, codec.SnapshotDecodeError) as exc:
        log.warning("ignoring snapshot cache", path=str(path), error=str(exc))
        return fresh
    if cached.mesh != fresh.mesh:
        return fresh
    wanted = {o.service for o in fresh.outbounds}
    endpoints = {s: eps for s, eps in cached.endpoints.items() if s in wanted}
    endpoints.update(fresh.endpoints)  # static endpoints in the config win
    log.info("loaded snapshot cache", path=str(path), services=len(endpoints))
    return msgspec.structs.replace(fresh, endpoints=endpoints)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def persist_snapshots(
    watch: SnapshotWatch,
    state_dir: Path,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Write every newer snapshot to ``state_dir`` (in a worker thread). A cancel point."""
    path = state_dir / SNAPSHOT_FILE
    version = 0
    task_status.started()
    while True:
        snapshot = await watch.wait_newer_than(version)
        version = snapshot.version
        try:
            await trio.to_thread.run_sync(_write_atomically, path, codec.encode(snapshot))
        except OSError as exc:
            log.warning("cannot write snapshot cache", path=str(path), error=str(exc))
