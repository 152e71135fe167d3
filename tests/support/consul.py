"""The ``consul`` fixture: a real dev-mode Consul on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshagent.demo.consul import ConsulProcess

__all__ = ["ConsulProcess", "consul"]


@pytest.fixture
def consul() -> Iterator[ConsulProcess]:
    """A started dev-mode Consul on free loopback ports; stopped after the test."""
    process = ConsulProcess()
    process.start()
    try:
        yield process
    finally:
        process.stop()
