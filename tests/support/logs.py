"""The agents' log lines, captured while a test's block runs."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from meshagent import log

__all__ = ["captured_log"]


@contextlib.contextmanager
def captured_log() -> Iterator[io.StringIO]:
    """The log lines written while the block runs (in-process agents included)."""
    out = io.StringIO()
    log._Settings.stream = out
    try:
        yield out
    finally:
        log._Settings.stream = None
