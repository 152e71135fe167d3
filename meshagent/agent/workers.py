"""Worker processes: the data path on every core.

With ``workers = N`` (N > 1) the agent process serves its listeners itself *and* runs
N - 1 worker processes (``python -m meshagent.agent.worker``), each with its own trio
loop, binding the same addresses with SO_REUSEPORT; the kernel spreads new connections
over all of them. The agent process stays the only one that talks to Consul and the
central agent, renews certificates and answers the admin endpoint: it feeds each worker
the snapshot in force and tells it when the certificate files changed.

Nursery layout::

    Workers.run                 lives as long as the data path (the agent's root nursery)
    ├── _watch_snapshots        wakes the forwarders when a new snapshot is published
    └── _keep_running (slot k)  one per worker: start it, forward, restart it if it dies
        └── _forward            snapshots and certificate changes, latest first

A worker that dies is restarted (1 s, doubling up to 30 s while it keeps dying); the
other processes keep their connections. Connections waiting in the dead worker's
accept queue are reset by the kernel: that is the price of SO_REUSEPORT.

Parent and worker talk over a socketpair: frames of a 4-byte length and a pickled
message. Both ends are this package at one version, started by the agent; nothing else
can reach the socketpair, so pickle is safe here and nowhere else.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from meshagent.agent.watch import SnapshotWatch
from meshagent.dataplane.connection import ConnectionCounters, DataplaneContext, HttpStats
from meshagent.dataplane.errors import BindError
from meshagent.dataplane.tls import IdentityFiles
from meshagent.log import get_logger
from meshagent.snapshot.model import Snapshot

log = get_logger("workers")

MAX_FRAME_BYTES = 64 * 1024 * 1024
READY_TIMEOUT_SECONDS = 30.0
STATS_TIMEOUT_SECONDS = 1.0
RESTART_BACKOFF_SECONDS = (1.0, 30.0)
HEALTHY_AFTER_SECONDS = 60.0
KILL_GRACE_SECONDS = 5.0


def default_worker_count() -> int:
    """The number of cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _worker_environment() -> dict[str, str]:
    """The agent's environment without systemd's notify and watchdog settings: only the
    agent process speaks to systemd (NotifyAccess=main)."""
    hidden = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    return {k: v for k, v in os.environ.items() if k not in hidden}


# --- messages ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogSetup:
    level: str
    fmt: str
    access: str  # "stderr", "off" or a file path
    context: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Init:
    index: int
    snapshot: Snapshot
    identities: Mapping[str, IdentityFiles]
    log: LogSetup
    ticket_secret: bytes | None  # TLS tickets that resume in every process of the agent


@dataclass(frozen=True, slots=True)
class NewSnapshot:
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Certificates:
    """The certificate files were rewritten (renewal, trust bundle): reload them."""

    identities: Mapping[str, IdentityFiles]


@dataclass(frozen=True, slots=True)
class StatsRequest:
    seq: int


@dataclass(frozen=True, slots=True)
class Drain:
    seconds: float


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class Failed:
    error: str


@dataclass(frozen=True, slots=True)
class Stats:
    seq: int
    by_listener: dict[str, ConnectionCounters]
    http: HttpStats


class ChannelError(Exception):
    """The other end sent something that is not a frame of ours."""


class Channel:
    """Length-prefixed pickled messages over a stream; sends are serialized."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._send_lock:
            await self._stream.send_all(len(data).to_bytes(4, "big") + data)

    async def receive(self) -> object | None:
        """The next message, or None once the other end closed. A cancel point.

        Raises:
            ChannelError: a frame over MAX_FRAME_BYTES, or bytes that do not unpickle.
        """
        while len(self._buffer) < 4:
            if not await self._fill():
                return None
        size = int.from_bytes(self._buffer[:4], "big")
        if size > MAX_FRAME_BYTES:
            raise ChannelError(f"frame of {size} bytes (at most {MAX_FRAME_BYTES})")
        while len(self._buffer) < 4 + size:
            if not await self._fill():
                return None
        data = bytes(self._buffer[4 : 4 + size])
        del self._buffer[: 4 + size]
        try:
            message: object = pickle.loads(data)  # our own worker: see the module doc
        except Exception as exc:
            raise ChannelError(f"undecodable frame: {exc}") from None
        return message

    async def _fill(self) -> bool:
        try:
            chunk = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._buffer += chunk
        return bool(chunk)

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


# --- statistics -------------------------------------------------------------------


def add_counters(
    into: dict[str, ConnectionCounters], more: Mapping[str, ConnectionCounters]
) -> None:
    for name, c in more.items():
        into.setdefault(name, ConnectionCounters()).add(c)


def add_http(into: HttpStats, more: HttpStats) -> None:
    for key, count in more.requests.items():
        into.requests[key] = into.requests.get(key, 0) + count
    for pair, slot in more.latency.items():
        mine = into.latency.get(pair)
        if mine is None:
            into.latency[pair] = list(slot)
        else:
            for n, value in enumerate(slot):
                mine[n] += value


def copy_stats(ctx: DataplaneContext) -> tuple[dict[str, ConnectionCounters], HttpStats]:
    """A copy of a data path's counters that later traffic does not change (its pools'
    gauges read now)."""
    ctx.sample_pools()
    by_listener: dict[str, ConnectionCounters] = {}
    add_counters(by_listener, ctx.by_listener)
    http = HttpStats()
    add_http(http, ctx.http)
    return by_listener, http


# --- the supervisor ---------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    index: int
    started: trio.Event = field(default_factory=trio.Event)
    channel: Channel | None = None
    pid: int | None = None
    stats: Stats | None = None
    arrived: trio.Event = field(default_factory=trio.Event)
    seq: int = 0


class WorkerFailed(Exception):
    """A worker process could not start, or did not say it serves: one line why."""


class Workers:
    """The agent's worker processes (``count`` - 1 of them: the agent serves too).
    Made inside the agent's trio run."""

    def __init__(
        self,
        count: int,
        identities: Mapping[str, IdentityFiles],
        log_setup: LogSetup,
        *,
        ticket_secret: bytes | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self._slots = [_Slot(index=n) for n in range(1, count)]
        self._identities = dict(identities)
        self._log = log_setup
        self._ticket_secret = ticket_secret
        self._argv = argv or [sys.executable, "-m", "meshagent.agent.worker"]
        self._certificates = 0
        self._poke = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        self._drain: float | None = None
        self._drain_started = trio.Event()
        # Counters of workers that exited (so the agent's totals never go backwards).
        self._retired: dict[str, ConnectionCounters] = {}
        self._retired_http = HttpStats()
        self.by_listener: dict[str, ConnectionCounters] = {}
        self.http = HttpStats()
        self.restarts = 0

    def draining(self) -> bool:
        return self._drain is not None

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self._slots if s.pid is not None]

    def processes(self) -> tuple[int, int]:
        """(processes serving now: the agent and its live workers, restarts so far)."""
        return 1 + sum(1 for s in self._slots if s.channel is not None), self.restarts

    def certificates_changed(self) -> None:
        """The certificate files were rewritten; every worker reloads them. Not async;
        callable from a worker thread too (renewal writes files in one)."""
        self._certificates += 1
        self._token.run_sync_soon(self._wake)

    def drain(self, seconds: float) -> None:
        """Tell every worker to drain within ``seconds``; none is restarted. Not async."""
        self._drain = seconds
        self._drain_started.set()
        self._wake()

    async def refresh(self, local: DataplaneContext | None) -> None:
        """Ask every worker for its counters (at most STATS_TIMEOUT_SECONDS) and sum them
        with ``local`` and the retired workers' into ``by_listener`` and ``http``."""
        with trio.move_on_after(STATS_TIMEOUT_SECONDS):
            async with trio.open_nursery() as nursery:
                for slot in self._slots:
                    nursery.start_soon(self._ask_stats, slot)
        by_listener: dict[str, ConnectionCounters] = {}
        http = HttpStats()
        add_counters(by_listener, self._retired)
        add_http(http, self._retired_http)
        if local is not None:
            add_counters(by_listener, local.by_listener)
            add_http(http, local.http)
        for slot in self._slots:
            if slot.stats is not None:
                add_counters(by_listener, slot.stats.by_listener)
                add_http(http, slot.stats.http)
        self.by_listener, self.http = by_listener, http

    async def _ask_stats(self, slot: _Slot) -> None:
        channel = slot.channel
        if channel is None:
            return
        slot.seq += 1
        seq = slot.seq
        try:
            await channel.send(StatsRequest(seq))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        while slot.stats is None or slot.stats.seq < seq:
            await slot.arrived.wait()

    def _wake(self) -> None:
        self._poke.set()
        self._poke = trio.Event()

    async def run(
        self, watch: SnapshotWatch, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start every worker; ``started()`` once all of them serve. Returns once they
        all exited after ``drain``. A cancel point (cancelling kills the workers).

        Raises:
            BindError: a worker could not start (before ``started``).
        """
        async with trio.open_nursery() as outer:
            outer.start_soon(self._watch_snapshots, watch)
            async with trio.open_nursery() as keepers:
                for slot in self._slots:
                    keepers.start_soon(self._keep_running, slot, watch)
                for slot in self._slots:
                    await slot.started.wait()
                log.info("workers ready", count=len(self._slots) + 1, pids=self.pids)
                task_status.started()
            outer.cancel_scope.cancel()

    async def _watch_snapshots(self, watch: SnapshotWatch) -> None:
        version = watch.current.version
        while True:
            version = (await watch.wait_newer_than(version)).version
            self._wake()

    async def _keep_running(self, slot: _Slot, watch: SnapshotWatch) -> None:
        low, high = RESTART_BACKOFF_SECONDS
        backoff = low
        while not self.draining():
            began = trio.current_time()
            try:
                code = await self._run_once(slot, watch)
            except WorkerFailed as exc:
                if not slot.started.is_set():
                    raise BindError(f"worker {slot.index}: {exc}") from None
                log.error("worker failed", worker=slot.index, error=str(exc))
            else:
                if self.draining():
                    return
                log.error("worker exited; restarting it", worker=slot.index, code=code)
            if trio.current_time() - began > HEALTHY_AFTER_SECONDS:
                backoff = low
            with trio.move_on_after(backoff):
                await self._drain_started.wait()
            backoff = min(high, backoff * 2)
            if not self.draining():
                self.restarts += 1

    async def _run_once(self, slot: _Slot, watch: SnapshotWatch) -> int:
        """Run one worker process to its end; its exit code."""
        ours, theirs = socket.socketpair()
        try:
            process = await trio.lowlevel.open_process(
                [*self._argv, str(theirs.fileno()), str(os.getpid())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env=_worker_environment(),
            )
        except OSError as exc:
            ours.close()
            raise WorkerFailed(f"cannot start: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        try:
            await self._serve(slot, channel, process, watch)
            with trio.move_on_after((self._drain or 0.0) + KILL_GRACE_SECONDS):
                return await process.wait()
            log.warning("worker did not stop in time: killed", worker=slot.index, pid=process.pid)
            process.kill()
            return await process.wait()
        finally:
            slot.channel, slot.pid = None, None
            if slot.stats is not None:
                for counters in slot.stats.by_listener.values():
                    counters.retire()
                add_counters(self._retired, slot.stats.by_listener)
                add_http(self._retired_http, slot.stats.http)
                slot.stats = None
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    with trio.move_on_after(KILL_GRACE_SECONDS):
                        await process.wait()
                await channel.aclose()

    async def _serve(
        self, slot: _Slot, channel: Channel, process: trio.Process, watch: SnapshotWatch
    ) -> None:
        """Hand the worker its start, wait until it serves, then forward changes and
        read its answers until it closes its end."""
        snapshot, certificates = watch.current, self._certificates
        try:
            await channel.send(
                Init(slot.index, snapshot, self._identities, self._log, self._ticket_secret)
            )
            with trio.fail_after(READY_TIMEOUT_SECONDS):
                answer = await channel.receive()
        except trio.TooSlowError:
            raise WorkerFailed(f"not ready after {READY_TIMEOUT_SECONDS:.0f}s") from None
        except (trio.BrokenResourceError, ChannelError) as exc:
            raise WorkerFailed(str(exc) or type(exc).__name__) from None
        if isinstance(answer, Failed):
            raise WorkerFailed(answer.error)
        if not isinstance(answer, Ready):
            code = await process.wait()
            raise WorkerFailed(f"exited before it served (exit code {code}); see its log above")
        slot.channel, slot.pid = channel, answer.pid
        log.info("worker serving", worker=slot.index, pid=answer.pid)
        slot.started.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward, channel, watch, snapshot.version, certificates)
            try:
                while (message := await channel.receive()) is not None:
                    if isinstance(message, Stats):
                        slot.stats = message
                        slot.arrived.set()
                        slot.arrived = trio.Event()
            except ChannelError as exc:
                log.error("worker sent garbage; stopping it", worker=slot.index, error=str(exc))
                process.kill()
            nursery.cancel_scope.cancel()

    async def _forward(
        self, channel: Channel, watch: SnapshotWatch, version: int, certificates: int
    ) -> None:
        drained = False
        try:
            while True:
                poke = self._poke
                if watch.current.version > version:
                    snapshot = watch.current
                    await channel.send(NewSnapshot(snapshot))
                    version = snapshot.version
                if self._certificates > certificates:
                    certificates = self._certificates
                    await channel.send(Certificates(self._identities))
                if self._drain is not None and not drained:
                    await channel.send(Drain(self._drain))
                    drained = True
                await poke.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the worker is gone; _serve sees its end of the socket close
