"""``run_central``'s leadership: SQLite always leads and runs the jobs; a Consul store
elects on ``<prefix>leader``; a session Consul refuses is one configuration line."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import pytest
import trio

from meshagent.central.main import leader_key, run_central, run_leadership
from meshagent.central.store import SqliteStore, TokenRecord, token_digest
from meshagent.config.central import CentralConfig, StoreSettings
from meshagent.config.load import ConfigError, Duration
from meshagent.demo.consul import ConsulProcess
from meshagent.demo.ports import free_port


async def test_sqlite_central_leads_and_purges_expired_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = CentralConfig(
        listen=f"127.0.0.1:{free_port()}", data_dir=str(tmp_path / "data"),
        leader_jobs_interval=Duration(0.1),
    )
    (tmp_path / "data").mkdir()
    async with await SqliteStore.open(config.store_path) as store:
        await store.create_token(TokenRecord(
            id="old", mesh=None, kind="admin", digest=token_digest("old"),
            expires_at=time.time() - 1, created_at=time.time() - 10,
        ))
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(
                run_central, config, say=lambda _: None, handle_signals=False, stop=stop
            ))
            async with await SqliteStore.open(config.store_path) as store:
                while "old" in [t.id for t in await store.list_tokens()]:
                    await trio.sleep(0.05)
            stop.set()
    err = capsys.readouterr().err
    assert "leader jobs running" in err and "expired tokens purged" in err


async def test_consul_leadership_uses_the_prefix_key(consul: ConsulProcess) -> None:
    config = CentralConfig(
        data_dir="/nonexistent",
        store=StoreSettings(kind="consul", address=consul.address, prefix="team-a/"),
    )
    assert leader_key(config) == "team-a/leader"
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            leadership = await nursery.start(run_leadership, config, "node-1")
            await leadership.wait_leader()
            nursery.cancel_scope.cancel()


async def test_a_session_consul_refuses_is_one_config_line(consul: ConsulProcess) -> None:
    # The dev Consul's session_ttl_min is 10 s.
    config = CentralConfig(
        data_dir="/nonexistent",
        store=StoreSettings(kind="consul", address=consul.address, session_ttl=Duration(1.0)),
    )
    with trio.fail_after(15), pytest.raises(ConfigError) as caught:
        await run_leadership(config, "node-1")
    text = str(caught.value)
    assert text.startswith("store: the leader election cannot start: consul at ")
    assert "Invalid Session TTL" in text and "\n" not in text
