"""Health probes of the local app behind an inbound.

``probe_app`` runs every probe configured in ``[inbound.health]`` (tcp, http, pidfile,
command), in that order; the app is healthy only if all pass. With none configured
the answer is the agent's own liveness: healthy, "agent running".

Invariants:
* Each probe ends within ``health.timeout``; a probe that runs out of time fails.
* ``probe_app`` never raises for a failing or unreachable app: failure is a result.
* Process-table and file reads (psutil) run in worker threads, at most two at a time
  (``_THREADS``), so a slow /proc never stalls the trio loop.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import psutil
import trio

from meshagent.config.agent import HealthSettings, InboundSettings
from meshagent.log import get_logger
from meshagent.snapshot.model import host_port

log = get_logger("probes")

# psutil walks /proc; two threads are plenty for a handful of inbounds.
_THREADS = trio.CapacityLimiter(2)
_MAX_STATUS_LINE_BYTES = 4096
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[ \r]")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What the probes found: ``output`` is one line for the Consul check's output."""

    healthy: bool
    output: str


async def probe_app(inbound: InboundSettings) -> ProbeResult:
    """Run the inbound's configured health probes against its app. Cancel point.

    Args:
        inbound: the inbound whose ``app_host``, ``app_port`` and ``health`` settings
            to use.

    Returns:
        healthy when every configured probe passed (or none is configured); the output
        lists what passed, or names the first probe that failed and why.
    """
    health = inbound.health
    app = host_port(inbound.app_host, inbound.app_port)
    probes: list[tuple[str, Callable[[], Awaitable[str]]]] = []
    if health.tcp:
        probes.append((f"tcp {app}", lambda: _tcp(inbound)))
    if health.http is not None:
        path = health.http
        probes.append((f"http {app}{path}", lambda: _http(inbound, path)))
    if health.pidfile is not None:
        pidfile = health.pidfile
        probes.append((f"pidfile {pidfile}", lambda: _pidfile(pidfile)))
    if health.command is not None:
        command = health.command
        probes.append((f"command {command!r}", lambda: _command(command)))
    if not probes:
        return ProbeResult(healthy=True, output="agent running")

    passed: list[str] = []
    for name, probe in probes:
        outcome = await _bounded(name, probe, health)
        if isinstance(outcome, ProbeResult):
            return outcome
        passed.append(f"{name}: {outcome}")
    return ProbeResult(healthy=True, output="; ".join(passed))


async def _bounded(
    name: str, probe: Callable[[], Awaitable[str]], health: HealthSettings
) -> str | ProbeResult:
    """Run one probe within ``health.timeout``: its "ok" text, or a failed result."""
    timeout = float(health.timeout)
    try:
        with trio.fail_after(timeout):
            return await probe()
    except trio.TooSlowError:
        reason = f"no answer within {timeout:g}s"
    except _ProbeFailed as exc:
        reason = str(exc)
    except trio.BrokenResourceError:
        reason = "connection broken"
    except OSError as exc:
        reason = _describe_os_error(exc)
    return ProbeResult(healthy=False, output=f"{name}: {reason}")


async def probe_app_safely(inbound: InboundSettings) -> ProbeResult:
    """``probe_app``, where an unexpected error in a probe (a bug) counts as unhealthy
    and is logged: it never raises, so the loops that feed Consul or the central agent
    keep running. Cancel point."""
    try:
        return await probe_app(inbound)
    except Exception as exc:  # error boundary: a probe bug must not end health reports
        log.error("probe crashed", service=inbound.service, error=repr(exc))
        return ProbeResult(healthy=False, output=f"probe crashed: {exc!r}")


class _ProbeFailed(Exception):
    """A probe ran and the app failed it; ``str()`` says why."""


async def _tcp(inbound: InboundSettings) -> str:
    stream = await trio.open_tcp_stream(inbound.app_host, inbound.app_port)
    await stream.aclose()
    return "connected"


async def _http(inbound: InboundSettings, path: str) -> str:
    """One HTTP/1.1 GET; only the status line is read."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host_port(inbound.app_host, inbound.app_port)}\r\n"
        "User-Agent: meshagent-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")
    stream = await trio.open_tcp_stream(inbound.app_host, inbound.app_port)
    async with stream:
        await stream.send_all(request)
        received = b""
        while b"\n" not in received and len(received) < _MAX_STATUS_LINE_BYTES:
            chunk = await stream.receive_some(_MAX_STATUS_LINE_BYTES)
            if not chunk:
                break
            received += chunk
    match = _STATUS_LINE.match(received)
    if match is None:
        raise _ProbeFailed("not an HTTP/1 response")
    status = int(match[1])
    if not 200 <= status < 400:
        raise _ProbeFailed(f"HTTP {status}")
    return f"HTTP {status}"


async def _pidfile(path: str) -> str:
    return await trio.to_thread.run_sync(
        _check_pidfile, path, limiter=_THREADS, abandon_on_cancel=True
    )


def _check_pidfile(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            text = file.read(64).strip()
    except FileNotFoundError:
        raise _ProbeFailed("no such file") from None
    if not text.isdigit() or int(text) <= 0:
        raise _ProbeFailed(f"{text[:20]!r} is not a process id")
    pid = int(text)
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        raise _ProbeFailed(f"process {pid} is not running") from None
    except psutil.Error as exc:
        raise _ProbeFailed(f"process {pid}: {exc}") from None
    if status in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
        raise _ProbeFailed(f"process {pid} is not running ({status})")
    return f"process {pid} running"


async def _command(substring: str) -> str:
    return await trio.to_thread.run_sync(
        _find_command, substring, limiter=_THREADS, abandon_on_cancel=True
    )


def _find_command(substring: str) -> str:
    own = os.getpid()
    for process in psutil.process_iter(["pid", "cmdline"]):
        info = process.info
        cmdline = info.get("cmdline") or []
        if info.get("pid") != own and substring in " ".join(cmdline):
            return f"process {info['pid']} running"
    raise _ProbeFailed("no running process has it in its command line")


def _describe_os_error(exc: OSError) -> str:
    """ "connection refused" for trio's grouped connect errors too."""
    causes: list[BaseException] = [exc]
    while causes:
        current = causes.pop()
        if isinstance(current, ConnectionRefusedError):
            return "connection refused"
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        if isinstance(current, BaseExceptionGroup):
            causes.extend(current.exceptions)
        if current.__cause__ is not None:
            causes.append(current.__cause__)
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = ["ProbeResult", "probe_app", "probe_app_safely"]
