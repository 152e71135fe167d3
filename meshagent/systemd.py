"""sd_notify for both processes (the agent and the central agent) under systemd.

* ``notify(state)``: one datagram ("READY=1", "STOPPING=1", ...) to ``$NOTIFY_SOCKET``;
  a no-op when it is unset (not started by systemd).
* ``watchdog()``: a task that sends "WATCHDOG=1" every half of ``$WATCHDOG_USEC``
  (the unit's ``WatchdogSec``). The pings come from the trio loop itself, so a wedged
  loop (a blocking call, a busy task that never yields) stops them and systemd
  restarts the process; a separate thread would keep pinging a dead agent.

A top-level module, like ``log``: process plumbing that both ``agent`` and
``central`` use, while neither may import the other.
"""

from __future__ import annotations

import os
import socket

import trio

from meshagent.log import get_logger

log = get_logger("systemd")


def notify(state: str) -> bool:
    """Send ``state`` (e.g. "READY=1") to $NOTIFY_SOCKET; True if sent. Not async: one
    datagram to a local socket never blocks for long."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between two WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, as
    sd_watchdog_enabled(3) advises. None when systemd asks for no pings: the variable
    is unset, not a positive integer, or ``$WATCHDOG_PID`` names another process (it
    was inherited from a parent that systemd watches)."""
    text = os.environ.get("WATCHDOG_USEC", "")
    if not text.isdigit() or int(text) == 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    return int(text) / 2 / 1_000_000


async def watchdog(until: trio.Event | None = None) -> None:
    """Ping systemd's watchdog until cancelled or ``until`` is set; return at once
    when systemd asks for no pings.

    A cancel point. Each ping is a non-blocking datagram; a failed one (no socket, a
    full queue) is not retried early: the next is due in half the interval anyway.
    ``until`` lets a process stop pinging when it starts stopping (systemd does not
    watch a stopping unit; ``TimeoutStopSec`` bounds it instead), so the task never
    holds a nursery open after the work it guards has ended.
    """
    interval = watchdog_interval()
    if interval is None:
        return
    stop = until if until is not None else trio.Event()
    log.info("watchdog on", interval=f"{interval:g}s")
    while not stop.is_set():
        notify("WATCHDOG=1")
        with trio.move_on_after(interval):
            await stop.wait()
