"""docs/operations.md lists every metric the agent exposes, and nothing it does not."""

from __future__ import annotations

import re

from prometheus_client import generate_latest

from meshagent.agent.metrics import AgentCollector, new_registry
from meshagent.dataplane.connection import ConnectionCounters, HttpStats
from meshagent.snapshot.model import Snapshot
from tests.docs.markdown import ROOT


def exposed() -> set[str]:
    http = HttpStats()
    http.record({"destination": "orders"}, 200, 0.01)
    collector = AgentCollector(
        lambda: {"inbound:orders": ConnectionCounters(failures={"handshake": 1})},
        lambda: http,
        lambda: Snapshot(version=1, mesh="shop"),
        {},
    )
    text = generate_latest(new_registry(collector)).decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))


def documented() -> set[str]:
    page = (ROOT / "docs" / "operations.md").read_text()
    section = page.split("## Metrics", 1)[1]
    return set(re.findall(r"^\| `(meshagent_[a-z_]+)` \|", section, re.MULTILINE))


def test_every_metric_is_documented_and_every_documented_one_exists() -> None:
    # Counters appear in TYPE lines without their _total suffix.
    names = {n + "_total" if n + "_total" in documented() else n for n in exposed()}
    assert names == documented()
