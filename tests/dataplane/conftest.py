from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tls import Contexts, make_contexts


@pytest.fixture
def contexts(tmp_path: Path) -> Contexts:
    """An ``orders`` server and a ``web`` client context of one mesh CA."""
    return make_contexts(tmp_path)
