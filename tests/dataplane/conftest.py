from __future__ import annotations

from pathlib import Path

import pytest
import trio

from meshagent.dataplane.nativepump import NativePump, native_problem
from tests.support.tls import Contexts, make_contexts


@pytest.fixture
def contexts(tmp_path: Path) -> Contexts:
    """An ``orders`` server and a ``web`` client context of one mesh CA."""
    return make_contexts(tmp_path)


@pytest.fixture
async def pump(nursery: trio.Nursery) -> NativePump:
    """A running C pump (test_http.py's own ``pump`` picks C or Python instead)."""
    # Built by `pip install` wherever a C compiler is (CI has one): not a skip.
    assert native_problem() is None, native_problem()
    started: NativePump = await nursery.start(NativePump().run)
    return started
