"""What every connection handler shares: ids, the snapshot source, TLS, the error boundary."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import trio

from meshagent.dataplane.errors import DataplaneError
from meshagent.dataplane.tls import TlsContexts
from meshagent.log import Logger
from meshagent.protocol.frames import FrameError
from meshagent.snapshot.model import Snapshot


class SnapshotSource(Protocol):
    """Where the data path reads its configuration: the latest published snapshot."""

    @property
    def current(self) -> Snapshot: ...


@dataclass(slots=True)
class ConnectionCounters:
    accepted: int = 0
    active: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(slots=True)
class DataplaneContext:
    source: SnapshotSource
    tls: TlsContexts
    counters: ConnectionCounters = field(default_factory=ConnectionCounters)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))


def peer_address(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


def describe(exc: BaseException) -> str:
    """One short line for a connection failure, flattening exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        return describe(exc.__cause__)
    if isinstance(exc, (DataplaneError, FrameError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@contextmanager
def connection_boundary(ctx: DataplaneContext, log: Logger, **fields: object) -> Iterator[None]:
    """The error boundary of one connection: count it, and turn any Exception into a log
    line. ``trio.Cancelled`` (a BaseException) passes through untouched."""
    counters = ctx.counters
    counters.accepted += 1
    counters.active += 1
    try:
        yield
    except Exception as exc:
        counters.failed += 1
        level = log.warning if isinstance(exc, DataplaneError) else log.error
        level("connection failed", error=describe(exc), **fields)
    finally:
        counters.active -= 1
