"""The per-connection error boundary."""

from __future__ import annotations

import pytest
import trio

from meshagent import log
from meshagent.dataplane.connection import DataplaneContext, Drain, connection_boundary
from meshagent.dataplane.errors import ConnectionBroken, NoEndpoints
from meshagent.dataplane.tls import TlsContexts
from meshagent.protocol.frames import FrameError
from tests.support.logs import captured_log


def _fail(exc: Exception) -> None:
    """Raise ``exc`` (as a connection's handler would), where mypy cannot tell that the
    ``with`` block always raises: the boundary swallows it and the test goes on."""
    raise exc


def _cancelled(scope: trio.CancelScope) -> bool:
    return scope.cancel_called


def _context() -> DataplaneContext:
    return DataplaneContext(source=None, tls=TlsContexts({}))  # type: ignore[arg-type]


async def test_errors_are_logged_and_swallowed() -> None:
    ctx = _context()
    with captured_log() as out, connection_boundary(ctx, log.get_logger("test"), "l", conn=7):
        _fail(NoEndpoints("orders: no healthy endpoint"))
    assert ctx.counters.failed == 1 and ctx.counters.active == 0
    line = out.getvalue()
    assert "level=warning" in line and "conn=7" in line and "no healthy endpoint" in line


def _broken(end: str | None, cause: Exception) -> ConnectionBroken:
    broken = ConnectionBroken(str(cause), end)
    broken.__cause__ = cause
    return broken


@pytest.mark.parametrize(
    ("error", "level", "reason"),
    [
        # A client that reset or went away is its own business: info, not a warning.
        (_broken("downstream", trio.BrokenResourceError("connection reset by peer")),
         "info", "downstream-broken"),
        (_broken("upstream", trio.BrokenResourceError("connection reset by peer")),
         "warning", "upstream-broken"),
        # Broken framing is a broken peer agent, whichever end it came from.
        (_broken("downstream", FrameError("data after END frame")), "warning", "protocol"),
        (_broken(None, trio.BrokenResourceError("cannot allocate memory")), "warning", "error"),
        (ValueError("a bug"), "error", "error"),  # not one of ours: a bug to report
    ],
    ids=["downstream", "upstream", "framing", "engine", "bug"],
)
def test_the_level_and_reason_say_whose_failure_it_was(
    error: Exception, level: str, reason: str
) -> None:
    ctx = _context()
    with captured_log() as out, connection_boundary(ctx, log.get_logger("test"), "l", conn=3):
        _fail(error)
    assert f"level={level} " in out.getvalue() and str(error) in out.getvalue()
    assert ctx.counters.failures == {reason: 1}


async def test_an_error_racing_a_cancellation_is_logged_and_the_cancellation_goes_on() -> None:
    # Draining: the agent cancels every connection while one of them breaks. trio then
    # raises one group holding both; only the Cancelled may leave the boundary.
    ctx = _context()
    with trio.CancelScope() as drain, connection_boundary(ctx, log.get_logger("test"), "l", conn=1):
        async with trio.open_nursery() as pumps:

            async def breaks_as_we_cancel() -> None:
                drain.cancel()
                raise trio.BrokenResourceError("peer reset")

            pumps.start_soon(trio.sleep_forever)
            pumps.start_soon(breaks_as_we_cancel)
    assert drain.cancelled_caught
    assert ctx.counters.failed == 1 and ctx.counters.active == 0


async def test_wanted_cancels_the_next_wait_of_that_listener_once() -> None:
    drain = Drain()
    scopes = [trio.CancelScope() for _ in range(5)]
    with drain.idle(scopes[0], "a"):  # idle before: left to reclaim
        with drain.wanted("a"):
            with drain.idle(scopes[1], "b"):  # another listener's
                pass
            with drain.idle(scopes[2], "a"):
                pass
            with drain.idle(scopes[3], "a"):  # one close per waiting client
                pass
        with drain.idle(scopes[4], "a"):  # the client got its place
            pass
    assert [scope.cancel_called for scope in scopes] == [False, False, True, False, False]


async def test_reclaim_cancels_the_longest_idle_wait_of_that_listener_only() -> None:
    drain = Drain()
    scopes = [trio.CancelScope() for _ in range(3)]
    with drain.idle(scopes[0], "a"), drain.idle(scopes[1], "b"), drain.idle(scopes[2], "a"):
        assert drain.reclaim("a") and scopes[0].cancel_called
        assert not scopes[2].cancel_called and not scopes[1].cancel_called
        scopes[2].cancel()  # cancelled otherwise (its own idle time ran out)
        assert not drain.reclaim("a")
        assert not drain.reclaim("none")
        drain.begin()
        assert _cancelled(scopes[1])  # the earlier assert narrowed the attribute for mypy
    with drain.idle(late := trio.CancelScope(), "a"):  # a drain already began
        assert late.cancel_called
