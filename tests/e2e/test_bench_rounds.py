"""bench/compare.py's rounds: the table gives medians, and each ratio is the median of
the ratios of measurements taken in the same round (seconds apart), not a ratio of
medians taken minutes apart."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def compare(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module("compare")
    yield module
    for name in ("compare", "common", "peers"):
        sys.modules.pop(name, None)


def bulk(
    compare: ModuleType, path: str, round_: int, cpu: float, p99_ms: float, p50_ms: float = 1.0
) -> object:
    """One bulk measurement: 1 GiB moved in 1 s, the pair spending ``cpu`` seconds."""
    load = compare.LoadResult(
        requests=10, seconds=1.0, bytes=compare.GIB, p50_us=p50_ms * 1000,
        p99_us=p99_ms * 1000, errors={},
    )
    return compare.Measured(
        "bulk", path, load=load, proxy_cpu={"a": cpu / 2, "b": cpu / 2}, round=round_
    )


def test_median(compare: ModuleType) -> None:
    assert compare.median([]) is None
    assert compare.median([3.0]) == 3.0
    assert compare.median([5.0, 1.0, 3.0]) == 3.0
    assert compare.median([4.0, 1.0, 3.0, 2.0]) == 2.5


def test_ratios_pair_measurements_of_the_same_round(compare: ModuleType) -> None:
    # HAProxy's cost drifts up over the run (a busier host); the pair's moves with it
    mine = [bulk(compare, "meshagent L4", r, c, 1.0) for r, c in ((1, 1.0), (2, 5.0), (3, 2.1))]
    theirs = [
        bulk(compare, "haproxy pair", r, c, 2.0, p50_ms=4.0) for r, c in ((1, 2.0), (2, 4.0), (3, 6.0))
    ]
    assert compare.paired(mine, theirs, compare.Measured.cost) == pytest.approx(
        [0.5, 1.25, 0.35]
    )
    rows = compare.render(mine + theirs, ["bulk"])
    row = next(line for line in rows if line.startswith("bulk") and "meshagent L4" in line)
    # median of the rounds' ratios (0.50x), not the ratio of the medians (2.1 / 4.0)
    assert "2.10 CPU-s/GiB" in row
    assert "0.50x" in row and "0.53x" not in row
    assert "0.25x" in row  # p50 x haproxy
    details = compare.details(mine + theirs, ["bulk"])
    assert any(
        "by round: cost 1.00 5.00 2.10; x haproxy 0.50 1.25 0.35; "
        "p50 x haproxy 0.25 0.25 0.25; p99 x haproxy 0.50 0.50 0.50" in d
        for d in details
    ), details


def test_a_round_a_path_missed_is_left_out_of_its_ratios(compare: ModuleType) -> None:
    mine = [bulk(compare, "meshagent HTTP", r, 1.0, 1.0) for r in (1, 2, 3)]
    theirs = [bulk(compare, "haproxy pair", r, c, 2.0) for r, c in ((1, 2.0), (3, 4.0))]
    failed = compare.Measured("bulk", "haproxy pair", round=2)  # its load generator failed
    assert compare.paired(mine, [*theirs, failed], compare.Measured.cost) == pytest.approx(
        [0.5, 0.25]
    )
    assert compare.paired(mine, [], compare.Measured.cost) == []


def test_agent_logs_are_counted_by_kind(compare: ModuleType, tmp_path: Path) -> None:
    """Under the table, what each agent logged: a pair whose figures look fine while
    its agents log errors has a bug (one was found this way)."""
    log = tmp_path / "l4-orders.log"
    reset = 'error="BrokenResourceError: socket connection broken: [Errno 104] reset"'
    log.write_text(
        'ts=1 level=error logger=inbound event="connection failed" error="data after END'
        ' frame" conn=1\n' * 3
        + f'ts=2 level=error logger=outbound event="connection failed" {reset} conn=2\n'
        + 'ts=3 level=warning logger=agent event=renewed conn=3\n'
    )
    quiet = tmp_path / "l4-web.log"
    quiet.write_text("")
    path = compare.PathUnderTest(
        "meshagent L4", 1, logs={"l4-orders": log, "l4-web": quiet, "gone": tmp_path / "x"}
    )
    lines = compare.agent_logs([path, compare.PathUnderTest("haproxy pair", 2)])
    assert len(lines) == 3, lines
    assert "l4-orders: 5 line(s) at warning or above, most: 3x connection failed: data after" \
        " END frame; 1x connection failed: BrokenResourceError" in lines[0]
    assert lines[1].endswith("l4-web: 0 line(s) at warning or above")
    assert lines[2].endswith("gone: 0 line(s) at warning or above")


@pytest.mark.parametrize(
    ("wanted", "nofile", "single", "mesh", "workers"),
    [
        (10_000, 1_048_576, 10_000, 10_000, 1),  # room for all in one process
        (10_000, 20_000, 9_900, 10_000, 2),  # this container's hard limit
        (10_000, 4_096, 1_948, 3_896, 2),  # the upstream bounds the meshagent pair too
        (10_000, 1_024, 412, 824, 2),
        (100, 20_000, 100, 100, 1),  # smoke
    ],
)
def test_the_memory_scenario_holds_what_descriptors_allow(
    compare: ModuleType, wanted: int, nofile: int, single: int, mesh: int, workers: int
) -> None:
    args = compare.parse_args(["--hold", str(wanted)])
    note = compare.plan_memory(args, nofile)
    assert (args.hold, args.hold_mesh, args.mesh_workers) == (single, mesh, workers)
    # a proxy process needs two descriptors per connection, the holder and upstream one
    assert 2 * -(-mesh // workers) <= nofile - 200
    if single == wanted:
        assert note == f"{wanted:,} connections"
    else:
        assert f"{mesh:,} connections through the meshagent pairs ({workers} processes" in note
        assert f"{single:,} through the others (RLIMIT_NOFILE {nofile:,}" in note


@pytest.mark.parametrize(
    ("steals", "tries", "kept", "retry_until"),
    [
        ([0.01], 1, 0, float("inf")),  # under the bar: measured once
        ([0.10, 0.015], 2, 1, float("inf")),  # taken again once
        ([0.10, 0.05, 0.08], 3, 1, float("inf")),  # at most three tries; the least stolen counts
        ([0.50], 1, 0, 0.0),  # not again once the run must finish
    ],
)
def test_a_measurement_the_hypervisor_stole_from_is_taken_again(
    compare: ModuleType, monkeypatch: pytest.MonkeyPatch,
    steals: list[float], tries: int, kept: int, retry_until: float,
) -> None:
    made: list[Any] = []

    def measure_load(*args: object) -> object:
        m: Any = bulk(compare, "haproxy pair", 1, cpu=len(made) + 1.0, p99_ms=1.0)
        m.steal = steals[len(made)]
        made.append(m)
        return m

    monkeypatch.setattr(compare, "measure_load", measure_load)
    m: Any = compare.measure_unstolen(None, None, None, None, 4.0, 1, 0.02, retry_until)
    assert len(made) == tries
    assert m is made[kept]
    assert m.stolen == [s for n, s in enumerate(steals) if n != kept]


def test_a_failed_try_is_reported_as_it_is(
    compare: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[Any] = []

    def measure_load(*args: object) -> object:
        m: Any = compare.Measured("bulk", "haproxy pair", errors={"load generator: boom": 1})
        if not made:
            m = bulk(compare, "haproxy pair", 1, cpu=1.0, p99_ms=1.0)
            m.steal = 0.5
        made.append(m)
        return m

    monkeypatch.setattr(compare, "measure_load", measure_load)
    m: Any = compare.measure_unstolen(None, None, None, None, 4.0, 1, 0.02)
    assert len(made) == 2 and m is made[1] and m.errors


def test_max_steal_is_a_share_in_percent(compare: ModuleType) -> None:
    assert compare.parse_args(["--max-steal", "5"]).max_steal == 5.0
    assert compare.parse_args([]).max_steal == 2.0
    assert compare.parse_args(["--smoke"]).max_steal == 100.0  # smoke never measures again
    with pytest.raises(SystemExit):
        compare.parse_args(["--max-steal", "120"])
