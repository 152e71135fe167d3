"""``http_proxy.StartFailure``: a connect the C relay's ``start`` made for a request, and
that failed, is the first try of the ``decide`` that comes right after, and of no other."""

from __future__ import annotations

import trio
import trio.testing

from meshagent.dataplane.errors import UpstreamConnectError
from meshagent.dataplane.http_proxy import START_FAILURE_FRESH_SECONDS, StartFailure


async def test_a_start_failure_counts_once_and_only_while_fresh(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failure = StartFailure()
    assert failure.take() is None
    error = UpstreamConnectError("connect app 127.0.0.1:8080: connection refused")
    failure.record("app", error)
    assert failure.take() == ("app", error)
    assert failure.take() is None  # taken by one decide only
    failure.record("app", error)
    await trio.sleep(START_FAILURE_FRESH_SECONDS / 2)
    assert failure.take() == ("app", error)
    failure.record("app", error)
    await trio.sleep(START_FAILURE_FRESH_SECONDS * 2)
    assert failure.take() is None  # the request came after the failure: decide tries afresh
    failure.record("app", error)
    failure.clear()  # start began again
    assert failure.take() is None
