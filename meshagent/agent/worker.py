"""One worker process of the agent: ``python -m meshagent.agent.worker FD AGENT_PID``.

Started by ``agent/workers.py`` with one end of a socketpair as FD and its own pid. It waits for its
``Init`` (snapshot, certificate files, log settings), binds every listener with
SO_REUSEPORT, says ``Ready`` and serves, applying what the agent sends: new snapshots,
reloaded certificates, requests for its counters, and the order to drain.

It ignores SIGINT, SIGTERM and SIGHUP: the agent process decides when to stop (a
Ctrl-C reaches the whole process group; ``systemctl stop`` with ``KillMode=mixed``
only the agent). If the agent process dies, even by SIGKILL, the kernel closes its end
of the socketpair and the worker stops at once: a worker never serves alone. (Not
PR_SET_PDEATHSIG: it fires when the *thread* that started the worker ends, and trio
starts processes from short-lived threads.)
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from functools import partial
from typing import TextIO

import trio

from meshagent import log
from meshagent.agent.watch import SnapshotWatch
from meshagent.agent.workers import (
    Certificates,
    Channel,
    Drain,
    Failed,
    Init,
    NewSnapshot,
    Ready,
    Stats,
    StatsRequest,
    copy_stats,
)
from meshagent.dataplane.errors import BindError
from meshagent.dataplane.serve import DataplaneHandle, serve_dataplane
from meshagent.dataplane.tls import TlsContexts

INIT_TIMEOUT_SECONDS = 10.0


def _configure_log(init: Init) -> None:
    routes: dict[str, TextIO | None] = {}
    if init.log.access == "off":
        routes["access"] = None
    elif init.log.access != "stderr":
        routes["access"] = log.open_log_file(init.log.access)
    log.configure(
        level=init.log.level,
        fmt=init.log.fmt,
        routes=routes,
        **init.log.context,
        worker=init.index,
    )


async def _serve_then_end(
    watch: SnapshotWatch,
    tls: TlsContexts,
    end: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[DataplaneHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        await serve_dataplane(watch, tls, reuse_port=True, task_status=task_status)
    finally:
        end.cancel()


async def _obey(
    channel: Channel,
    watch: SnapshotWatch,
    tls: TlsContexts,
    dataplane: DataplaneHandle,
    end: trio.CancelScope,
) -> None:
    """Apply the agent's messages; the agent gone means stop at once."""
    worker_log = log.get_logger("worker")
    while True:
        message = await channel.receive()
        if message is None:
            worker_log.warning("the agent process is gone: stopping")
            end.cancel()
            return
        if isinstance(message, NewSnapshot):
            watch.publish(message.snapshot)
        elif isinstance(message, Certificates):
            tls.swap(message.identities)
            worker_log.info("certificates reloaded")
        elif isinstance(message, StatsRequest):
            by_listener, http = copy_stats(dataplane.context)
            await channel.send(Stats(message.seq, by_listener, http))
        elif isinstance(message, Drain):
            dataplane.drain(message.seconds)


async def serve_worker(fd: int) -> int:
    """Serve as one worker of the agent on the socketpair end ``fd``; the exit code."""
    sock = socket.socket(fileno=fd)
    channel = Channel(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
    async with channel:
        with trio.move_on_after(INIT_TIMEOUT_SECONDS):
            init = await channel.receive()
        if not isinstance(init, Init):
            print("meshagent worker: no start message from the agent", file=sys.stderr)
            return 1
        _configure_log(init)
        watch = SnapshotWatch(init.snapshot, warn=False)
        try:
            tls = TlsContexts(init.identities, ticket_secret=init.ticket_secret)
        except (OSError, ValueError) as exc:
            await channel.send(Failed(f"cannot load certificates: {exc}"))
            return 1
        async with trio.open_nursery() as root:
            try:
                dataplane: DataplaneHandle = await root.start(
                    _serve_then_end, watch, tls, root.cancel_scope
                )
            except BindError as exc:
                await channel.send(Failed(str(exc)))
                return 1
            await channel.send(Ready(os.getpid()))
            root.start_soon(_obey, channel, watch, tls, dataplane, root.cancel_scope)
    return 0


def main(argv: list[str]) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if len(argv) != 3 or not (argv[1].isdigit() and argv[2].isdigit()):
        print(
            "usage: python -m meshagent.agent.worker FD AGENT_PID (started by meshagent run)",
            file=sys.stderr,
        )
        return 2
    if os.getppid() != int(argv[2]):  # the agent died before this worker started
        return 1
    return trio.run(partial(serve_worker, int(argv[1])))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
