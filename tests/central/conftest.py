"""Fixtures of the central store tests: one suite, two backends.

``backend`` is parametrised over SQLite (a file in tmp_path) and Consul KV (a real
dev-mode Consul shared by the tests of a module, with a fresh key prefix per test so
tests never see each other's keys). ``backend.open()`` opens one more handle on the same
data: a second central process on the SQLite file, a second replica on Consul.

``short_ttl_consul`` is a dev-mode Consul whose ``session_ttl_min`` is 1 s (the default
is 10 s), so session expiry can be tested in seconds.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshagent.central.store import ConsulKvStore, SqliteStore, Store
from meshagent.demo.consul import ConsulProcess, consul_binary
from meshagent.discovery.consul import ConsulClient

# How often a SQLite store looks for changes made through another handle.
SQLITE_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[], AbstractAsyncContextManager[Store]]
    consul_address: str | None = None
    prefix: str = ""


@pytest.fixture(scope="module")
def module_consul() -> Iterator[ConsulProcess]:
    """One dev-mode Consul for every store test of a module (tests use their own prefix)."""
    process = ConsulProcess()
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(params=["sqlite", "consul"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        path = tmp_path / "state" / "central.db"

        @asynccontextmanager
        async def open_sqlite() -> AsyncIterator[Store]:
            async with await SqliteStore.open(
                path, poll_interval_seconds=SQLITE_POLL_SECONDS
            ) as store:
                yield store

        return Backend("sqlite", open_sqlite)

    consul: ConsulProcess = request.getfixturevalue("module_consul")
    prefix = f"test-{uuid.uuid4().hex[:10]}/"

    @asynccontextmanager
    async def open_consul() -> AsyncIterator[Store]:
        async with ConsulClient(consul.address) as client:
            yield ConsulKvStore(client, prefix)

    return Backend("consul", open_consul, consul_address=consul.address, prefix=prefix)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    async with backend.open() as opened:
        yield opened


@pytest.fixture
def short_ttl_consul(tmp_path: Path) -> Iterator[ConsulProcess]:
    """A dev-mode Consul accepting session TTLs from 1 s (a wrapper adds the setting)."""
    wrapper = tmp_path / "consul-short-ttl"
    wrapper.write_text(
        f"#!/bin/sh\nexec '{consul_binary()}' \"$@\" '-hcl=session_ttl_min = \"1s\"'\n"
    )
    wrapper.chmod(0o755)
    process = ConsulProcess(binary=str(wrapper))
    process.start()
    try:
        yield process
    finally:
        process.stop()
