"""The meshagent pair against HAProxy and Consul's built-in proxy, side by side, on the
work issue 5 sets: CPU of the proxy pair per unit of work, latency, memory.

    python bench/compare.py            # full run, about 7-10 minutes
    python bench/compare.py --smoke    # seconds; installs nothing; for CI
    python bench/compare.py --profile http   # py-spy on the HTTP pair under keep-alive

Everything runs on this host, on loopback, with free ports. The upstream is nginx (one
worker) serving a 100-byte body at /small (and /closing) and a 100 MiB body at /bulk,
or the Python stand-in ``bench/upstream.py`` when nginx is not installed. Paths to it
(see peers.py): direct, the meshagent pair in L4 mode and in HTTP mode, an HAProxy pair
with mTLS both ways, and a Consul 1.8.7 ``consul connect proxy`` pair. Scenarios, each
run on every path in turn:

    keep-alive  wrk -t1 -c32, GET /small on kept-alive connections
    paced keep-alive  the same, each connection waiting 5 ms on average after each
                response: 5,000-6,000 requests/s on every path, for latency at one load
    bursts      32 kept-alive connections, one GET /small on each at the same moment
                every 20 ms (bench/loadgen.py, as wrk cannot): a caller that fans out
    app closes  the same as keep-alive, to /closing, which nginx answers with
                Connection: close and a close (keepalive_requests 1): an app with
                keep-alive off; not one of issue 5's targets
    new conn    wrk -t1 -c16 with Connection: close: a new connection per request
    paced conn  the same, each connection waiting 25 ms on average after each
                response: about 600 connections/s on every path, for latency at one load
    bulk        wrk -t1 -c1, GET /bulk (100 MiB bodies)
    memory      10,000 connections (smoke: 100), each after one GET /small, held
                idle; RSS per connection per proxy. Fewer through a single-process
                peer when RLIMIT_NOFILE cannot give it two sockets per connection; a
                meshagent pair then runs more processes per agent (plan_memory)

A paced connection's wait is drawn at random (exponential, as the gaps between
independent arrivals): with the same wait every time the connections fall into step and
every path gets bursts of all of them at once (see bench/README.md).

The load generator is wrk, or ``bench/loadgen.py`` when wrk is not installed. CPU
(user + system, with psutil) of the proxy processes is read before and after each
run, and divided by the work done: µs per request, CPU-s per GiB. Each load scenario
runs in rounds (``--rounds``, default 3): every path once per round, each round in
another order, so that a slow spell of the shared host falls on different paths. A
measurement the hypervisor stole more than ``--max-steal`` percent of the host's CPU
time from is taken again (at most twice; the try with the least steal counts). The
table gives the median over the rounds, and ratios to the direct path and to each peer
as the median of the rounds' ratios (each between measurements seconds apart).

Without ``--smoke`` missing Debian packages (nginx-light, haproxy, wrk) are installed
with apt-get (``--no-install`` to skip); Consul always comes from
``scripts/install-consul.sh`` when missing (it honours MESHAGENT_CONSUL_DEB). A path
that cannot run is reported as ``not run: <reason>`` and the rest goes on. Every
process started here is stopped by pid at the end, on Ctrl-C, on SIGTERM, on an error
and when the run's deadline (``--deadline``) passes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import psutil
from common import (
    SetupError,
    describe_log,
    environment,
    fmt,
    log_summary,
    raise_open_files_limit,
    ratio,
    read_line,
    render_table,
    rounded,
    stop_all,
    stop_process,
    tail,
    times,
    tree_cpu_seconds,
    tree_rss,
    work_in,
    write_identities,
)
from peers import (
    PathUnderTest,
    Stopper,
    Tools,
    Upstream,
    find_tools,
    start_consul_pair,
    start_haproxy_pair,
    start_meshagent_pair,
    start_upstream,
)

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
GIB = 1 << 30
# tries of one measurement at most, while the hypervisor steals (--max-steal)
STEAL_TRIES = 3
# besides the memory scenario's hold: what the run needs after the last try it repeats
RETRY_RESERVE_SECONDS = 180.0
BULK_BYTES = 100 * MIB
HOLD = 10_000
PATH_NAMES = ("direct", "meshagent L4", "meshagent HTTP", "haproxy pair", "consul pair")
PEERS = ("haproxy pair", "consul pair")  # the ratios' references, beside direct

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %.1f, ' ..
    '"p99_us": %.1f, "errors": {"connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d}}\\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


class DeadlineReached(Exception):
    """The run's --deadline passed."""


@dataclass(frozen=True)
class Scenario:
    name: str
    target: str  # URL path
    connections: int
    close: bool = False
    delay_ms: int = 0  # mean wait between a response and the connection's next request
    burst_ms: int = 0  # every connection at once, this often (bench/loadgen.py's bursts)


KEEPALIVE = Scenario("keep-alive", "/small", 32)
# kept-alive clients of an app that closes after every answer (legacy apps often run
# with keep-alive off): a proxy that speaks HTTP keeps the clients' connections and
# connects the app per request; an L4 proxy passes each close on to its client
APP_CLOSES = Scenario("app closes", "/closing", 32)
NEW_CONNECTION = Scenario("new conn", "/small", 16, close=True)
# wrk keeps its connections busy whatever the rate, so a faster path works under more
# load; with a think time each path is offered about the same rate (connections /
# (delay + latency)), below what the slowest peer sustains: 32 / 5 ms (6,400 requests/s)
# is under a third of what either peer serves on kept-alive connections here, 16 / 25 ms
# (640 connections/s) below the 750-860 new connections/s of HAProxy's pair
PACED_KEEPALIVE = Scenario("paced keep-alive", "/small", 32, delay_ms=5)
PACED_CONNECTION = Scenario("paced conn", "/small", 16, close=True, delay_ms=25)
# a caller that fans out: all 32 at once every 20 ms (1,600 requests/s), each request
# waiting behind the others of its burst in every stage
BURSTS = Scenario("bursts", "/small", 32, burst_ms=20)
BULK = Scenario("bulk", "/bulk", 1)
LOAD_SCENARIOS = (
    KEEPALIVE, PACED_KEEPALIVE, BURSTS, APP_CLOSES, NEW_CONNECTION, PACED_CONNECTION, BULK
)
MEMORY = "memory"
SCENARIO_NAMES = (*(s.name for s in LOAD_SCENARIOS), MEMORY)


def label(scenario: str, path: str) -> str:
    """The start of a line about one path in one scenario, aligned with the others."""
    return f"  {scenario:{max(map(len, SCENARIO_NAMES))}} {path:14}"


# --------------------------------------------------------------------------------------
# Load


@dataclass
class LoadResult:
    requests: int
    seconds: float
    bytes: int
    p50_us: float
    p99_us: float
    errors: dict[str, int]
    first_us: float | None = None  # bursts: when a burst's first answer came (median)
    last_us: float | None = None  # and its last


def run_load(
    tools: Tools, tmp: Path, port: int, scenario: Scenario, seconds: float
) -> LoadResult:
    """One run of wrk (or bench/loadgen.py: without wrk, and for bursts) against
    127.0.0.1:``port``."""
    url = f"http://127.0.0.1:{port}{scenario.target}"
    if "wrk" in tools.paths and not scenario.burst_ms:
        script = tmp / f"report-{scenario.delay_ms}.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT + (
                # exponential, mean delay_ms (whole ms: wrk's timers)
                "delay = function() return math.floor("
                f"-{scenario.delay_ms} * math.log(1 - math.random()) + 0.5) end\n"
                if scenario.delay_ms else ""
            ))
        args = [
            tools.paths["wrk"], "-t1", f"-c{scenario.connections}",
            f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(script),
        ]
        if scenario.close:
            args += ["-H", "Connection: close"]
        done = subprocess.run(
            [*args, url], capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        lines = [x for x in done.stdout.splitlines() if x.startswith("WRKJSON ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        data = json.loads(lines[-1].removeprefix("WRKJSON "))
    else:
        args = [
            sys.executable, str(HERE / "loadgen.py"), "run", "--port", str(port),
            "--path", scenario.target, "--connections", str(scenario.connections),
            "--seconds", str(seconds),
        ]
        if scenario.close:
            args.append("--close")
        if scenario.delay_ms:
            args += ["--delay-ms", str(scenario.delay_ms)]
        if scenario.burst_ms:
            args += ["--burst-ms", str(scenario.burst_ms)]
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
        if done.returncode != 0 or not done.stdout.strip():
            raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        data = json.loads(done.stdout.strip().splitlines()[-1])
    return LoadResult(
        requests=int(data["requests"]),
        seconds=float(data["duration_us"]) / 1e6,
        bytes=int(data["bytes"]),
        p50_us=float(data["p50_us"]),
        p99_us=float(data["p99_us"]),
        errors={k: int(v) for k, v in data["errors"].items() if v},
        first_us=data.get("first_us"),
        last_us=data.get("last_us"),
    )


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = tree_cpu_seconds(pid)
        except psutil.Error:
            out[name] = float("nan")
    return out


def host_times() -> tuple[float, float]:
    """(CPU seconds the hypervisor gave to others while this host's guest wanted to run
    (steal), all CPU seconds), summed over the CPUs since boot."""
    t = psutil.cpu_times()
    steal = float(getattr(t, "steal", 0.0))
    return steal, float(t.user + t.nice + t.system + t.idle) + steal + sum(
        float(getattr(t, name, 0.0)) for name in ("iowait", "irq", "softirq")
    )


def rss_of(pids: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = tree_rss(pid)
        except psutil.Error:
            out[name] = 0
    return out


# --------------------------------------------------------------------------------------
# Measurements


@dataclass
class Measured:
    scenario: str
    path: str
    not_run: str | None = None
    round: int = 1
    load: LoadResult | None = None
    proxy_cpu: dict[str, float] = field(default_factory=dict)  # seconds, per process
    control_cpu: dict[str, float] = field(default_factory=dict)
    held: int = 0
    rss_kib_per_conn: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    steal: float | None = None  # share of the host's CPU time stolen while measured
    stolen: list[float] = field(default_factory=list)  # the steal of tries thrown away

    @property
    def cpu(self) -> float:
        return sum(self.proxy_cpu.values())

    def rate(self) -> float | None:
        """Requests per second (memory: connections held)."""
        if self.scenario == MEMORY:
            return float(self.held)
        if self.load is None or self.load.seconds <= 0:
            return None
        return self.load.requests / self.load.seconds

    def mb_per_s(self) -> float | None:
        if self.load is None or self.load.seconds <= 0:
            return None
        return self.load.bytes / self.load.seconds / 1e6

    def cost(self) -> float | None:
        """The proxy pair's cost per unit: µs of CPU per request, CPU-s per GiB (bulk),
        KiB of RSS per held connection (memory: the larger of the two proxies)."""
        if self.scenario == MEMORY:
            return max(self.rss_kib_per_conn.values()) if self.rss_kib_per_conn else None
        if self.load is None or not self.proxy_cpu:
            return None
        if self.scenario == BULK.name:
            return self.cpu / (self.load.bytes / GIB) if self.load.bytes else None
        return 1e6 * self.cpu / self.load.requests if self.load.requests else None

    def control_cost(self) -> float | None:
        if not self.control_cpu or self.load is None:
            return None
        total = sum(self.control_cpu.values())
        if self.scenario == BULK.name:
            return total / (self.load.bytes / GIB) if self.load.bytes else None
        return 1e6 * total / self.load.requests if self.load.requests else None


def measure_load(
    tools: Tools, tmp: Path, path: PathUnderTest, scenario: Scenario, seconds: float,
    round_: int = 1,
) -> Measured:
    m = Measured(scenario.name, path.name, round=round_)
    before, before_ctl = cpu_of(path.proxies), cpu_of(path.control)
    steal_before, total_before = host_times()
    try:
        m.load = run_load(tools, tmp, path.port, scenario, seconds)
    except (RuntimeError, OSError, ValueError, KeyError, subprocess.TimeoutExpired) as exc:
        m.errors = {f"load generator: {exc}"[:160]: 1}
        return m
    steal_after, total_after = host_times()
    after, after_ctl = cpu_of(path.proxies), cpu_of(path.control)
    if total_after > total_before:
        m.steal = (steal_after - steal_before) / (total_after - total_before)
    m.proxy_cpu = {n: after[n] - before[n] for n in before}
    m.control_cpu = {n: after_ctl[n] - before_ctl[n] for n in before_ctl}
    m.errors = dict(m.load.errors)
    return m


def measure_unstolen(
    tools: Tools, tmp: Path, path: PathUnderTest, scenario: Scenario, seconds: float,
    round_: int, max_steal: float, retry_until: float = float("inf"),
) -> Measured:
    """measure_load, taken again (at most STEAL_TRIES tries in all, and not after the
    ``time.monotonic()`` of ``retry_until``) while the hypervisor took more than
    ``max_steal`` of the host's CPU time during it: the measurement with the least steal
    counts, whatever its figures, so no path is favoured."""
    tries: list[Measured] = []
    while len(tries) < STEAL_TRIES:
        m = measure_load(tools, tmp, path, scenario, seconds, round_)
        tries.append(m)
        if m.load is None or m.steal is None or m.steal <= max_steal:
            break
        if time.monotonic() >= retry_until:
            break
    if tries[-1].load is None:
        return tries[-1]  # a failed try is reported as it is
    kept = min(tries, key=lambda t: t.steal or 0.0)
    kept.stolen = [t.steal for t in tries if t is not kept and t.steal is not None]
    return kept


def measure_memory(tmp: Path, path: PathUnderTest, connections: int, seconds: float) -> Measured:
    """Hold ``connections`` idle connections (each after one GET /small) through the
    path; RSS of each proxy before and while they are held."""
    m = Measured(MEMORY, path.name)
    before = rss_of(path.proxies)
    log = tmp / f"hold-{path.name.replace(' ', '-')}.log"
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "loadgen.py"), "hold", "--port", str(path.port),
             "--connections", str(connections), "--seconds", str(seconds)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
        )
    try:
        words = read_line(proc, seconds + 30).decode(errors="replace").split(" ", 2)
        if len(words) != 3 or words[0] != "HELD":
            m.errors = {f"the connection holder failed: {' '.join(tail(log, 2))}"[:160]: 1}
            return m
        m.held = int(words[1])
        m.errors = {k: int(v) for k, v in json.loads(words[2]).items()}
        time.sleep(0.5)  # let the proxies finish what the last answers left them
        during = rss_of(path.proxies)
        if m.held:
            m.rss_kib_per_conn = {
                n: (during[n] - before[n]) / 1024 / m.held for n in path.proxies
            }
        assert proc.stdin is not None
        with suppress(OSError):
            proc.stdin.write(b"BYE\n")
            proc.stdin.flush()
        with suppress(subprocess.TimeoutExpired):
            proc.wait(30)
    finally:
        stop_process(proc)
    return m


# --------------------------------------------------------------------------------------
# The report


def unit(scenario: str) -> tuple[str, str]:
    """(rate unit, cost unit)"""
    if scenario == MEMORY:
        return "held", "KiB/conn"
    if scenario == BULK.name:
        return "req/s", "CPU-s/GiB"
    return "req/s", "µs/req"


def _lat(us: float | None) -> str:
    if us is None:
        return "-"
    if us >= 1000:
        return f"{fmt(us / 1000)} ms"
    return f"{fmt(us)} µs"


def _xm(ratios: list[float]) -> str:
    """The median of per-round ratios."""
    return times(median(ratios))


def median(values: list[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _median_of(rounds: list[Measured], value: Callable[[Measured], float | None]) -> float | None:
    return median([v for v in map(value, rounds) if v is not None])


def paired(
    mine: list[Measured], theirs: list[Measured], value: Callable[[Measured], float | None]
) -> list[float]:
    """value(mine) / value(theirs) for each round both ran in, in round order: two
    measurements seconds apart, which a slow spell of the host moves alike."""
    by_round = {t.round: t for t in theirs if t.not_run is None}
    ratios = []
    for m in sorted(mine, key=lambda m: m.round):
        t = by_round.get(m.round)
        r = ratio(value(m), value(t) if t is not None else None)
        if r is not None:
            ratios.append(r)
    return ratios


def _throughput(m: Measured) -> float | None:
    return m.mb_per_s() if m.scenario == BULK.name else m.rate()


def _p50(m: Measured) -> float | None:
    return m.load.p50_us if m.load is not None else None


def _p99(m: Measured) -> float | None:
    return m.load.p99_us if m.load is not None else None


def grouped(results: list[Measured], scenario: str) -> dict[str, list[Measured]]:
    """The rounds of each path in a scenario, by path name."""
    out: dict[str, list[Measured]] = {}
    for m in results:
        if m.scenario == scenario:
            out.setdefault(m.path, []).append(m)
    return out


def render(results: list[Measured], scenarios: list[str]) -> list[str]:
    header = [
        "scenario", "path", "rate", "MB/s", "p50", "p99", "pair cost", "x direct",
        "cost x haproxy", "cost x consul", "p50 x haproxy", "p99 x haproxy", "errors",
    ]
    rows: list[list[str]] = [header]
    skipped: dict[int, str] = {}
    for scenario in scenarios:
        mine = grouped(results, scenario)
        rate_unit, cost_unit = unit(scenario)
        for name in PATH_NAMES:
            rounds = mine.get(name)
            if not rounds:
                continue
            if rounds[0].not_run is not None:
                skipped[len(rows)] = rounds[0].not_run
                rows.append([scenario, name] + [""] * (len(header) - 2))
                continue
            is_memory = scenario == MEMORY
            rate = _median_of(rounds, Measured.rate)
            cost = _median_of(rounds, Measured.cost)
            rows.append([
                scenario,
                name,
                f"{fmt(rate)} {rate_unit}" if rate is not None else "-",
                "-" if is_memory else fmt(_median_of(rounds, Measured.mb_per_s)),
                _lat(_median_of(rounds, _p50)),
                _lat(_median_of(rounds, _p99)),
                f"{fmt(cost)} {cost_unit}" if cost is not None else "-",
                "-" if is_memory else _xm(paired(rounds, mine.get("direct", []), _throughput)),
                *(_xm(paired(rounds, mine.get(peer, []), Measured.cost)) for peer in PEERS),
                _xm(paired(rounds, mine.get("haproxy pair", []), _p50)),
                _xm(paired(rounds, mine.get("haproxy pair", []), _p99)),
                str(sum(sum(m.errors.values()) for m in rounds)),
            ])
    lines = render_table(rows, left=2)
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for index, reason in skipped.items():
        row = rows[index]
        first = f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}"
        lines[index + 1] = f"{first}  not run: {reason}"
    return lines


def details(results: list[Measured], scenarios: list[str]) -> list[str]:
    out = []
    for scenario in scenarios:
        mine = grouped(results, scenario)
        for name in PATH_NAMES:
            rounds = [m for m in mine.get(name, []) if m.not_run is None]
            if rounds:
                out.extend(_details_of(rounds, mine))
    return out


def _by_round(values: list[float]) -> str:
    return " ".join(fmt(v) for v in values)


def _details_of(rounds: list[Measured], mine: dict[str, list[Measured]]) -> list[str]:
    out = []
    first = rounds[0]
    if len(rounds) > 1:
        costs = [c for m in rounds if (c := m.cost()) is not None]
        parts = [f"cost {_by_round(costs)}"] if costs else []
        for peer in PEERS:
            ratios = paired(rounds, mine.get(peer, []), Measured.cost)
            if ratios and first.path != peer:
                parts.append(f"x {peer.split()[0]} {_by_round(ratios)}")
        for name, latency in (("p50", _p50), ("p99", _p99)):
            ratios = paired(rounds, mine.get("haproxy pair", []), latency)
            if ratios and first.path != "haproxy pair":
                parts.append(f"{name} x haproxy {_by_round(ratios)}")
        steals = [100 * m.steal for m in rounds if m.steal is not None]
        if steals:
            thrown = sum(len(m.stolen) for m in rounds)
            parts.append("steal " + " ".join(f"{v:.1f}" for v in steals) + " %"
                         + (f" ({thrown} stolen tries thrown away)" if thrown else ""))
        if parts:
            out.append(label(first.scenario, first.path) + " by round: " + "; ".join(parts))
    for m in rounds:
        parts = []
        if m.proxy_cpu:
            parts.append("CPU s " + ", ".join(f"{n} {v:.2f}" for n, v in m.proxy_cpu.items()))
        if m.control_cpu:
            ctl = m.control_cost()
            _, cost_unit = unit(m.scenario)
            parts.append(
                "besides the pair: " + ", ".join(f"{n} {v:.2f} s" for n, v in m.control_cpu.items())
                + (f" ({fmt(ctl)} {cost_unit})" if ctl is not None else "")
            )
        if m.load is not None and m.load.first_us is not None and m.load.last_us is not None:
            parts.append(
                f"a burst's first answer after {_lat(m.load.first_us)}, its last after "
                f"{_lat(m.load.last_us)} (medians over the bursts)"
            )
        if m.rss_kib_per_conn:
            parts.append("RSS " + ", ".join(
                f"{n} {fmt(v)} KiB/conn" for n, v in m.rss_kib_per_conn.items()
            ))
        if m.errors:
            parts.append(f"errors {m.errors}")
        if parts:
            round_label = f"round {m.round}: " if len(rounds) > 1 else ""
            out.append(label(m.scenario, m.path) + f" {round_label}" + "; ".join(parts))
    return out


# --------------------------------------------------------------------------------------
# The run


def agent_logs(paths: list[PathUnderTest]) -> list[str]:
    """What the meshagent pairs' agents logged (at warning and above: the level the
    benchmark runs them at), by kind: a path that logged errors under load has a bug
    or a peer that misbehaved, whatever its figures say."""
    lines = []
    for path in paths:
        for agent, log in path.logs.items():
            lines.append(label("log", path.name) + f" {agent}: {describe_log(log_summary(log))}")
    return lines


@contextmanager
def signals_as_exceptions(deadline: float) -> Iterator[None]:
    """SIGTERM becomes KeyboardInterrupt and the deadline (SIGALRM) DeadlineReached, so
    the ``finally`` that stops every process runs in both cases."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise DeadlineReached

    old_term = signal.signal(signal.SIGTERM, on_term)
    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(max(1, round(deadline)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGALRM, old_alarm)


def start_paths(
    args: argparse.Namespace, tools: Tools, tmp: Path, upstream: Upstream, nofile: int,
    stops: list[Stopper],
) -> list[PathUnderTest]:
    tls = write_identities(tmp)
    hold = args.hold
    mesh_hold = args.hold_mesh
    starters: dict[str, Callable[[], PathUnderTest]] = {
        "direct": lambda: PathUnderTest("direct", upstream.port),
        "meshagent L4": lambda: start_meshagent_pair(
            "meshagent L4", None, tls, tmp, upstream, mesh_hold + 100, stops),
        "meshagent HTTP": lambda: start_meshagent_pair(
            "meshagent HTTP", "http", tls, tmp, upstream, mesh_hold + 100, stops),
        "haproxy pair": lambda: start_haproxy_pair(
            tools, tls, tmp, upstream, max(256, min(hold + 100, (nofile - 100) // 2)), stops),
        "consul pair": lambda: start_consul_pair(tools, tmp, upstream, stops),
    }
    needs = {"haproxy pair": "haproxy", "consul pair": "consul"}
    paths = []
    for name in args.paths:
        tool = needs.get(name)
        if tool is not None and tool in tools.missing:
            paths.append(PathUnderTest(name, not_run=tools.missing[tool]))
            continue
        began = time.monotonic()
        try:
            path = starters[name]()
        except (SetupError, RuntimeError, OSError, ValueError) as exc:
            line = exc.args[0] if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"
            print(f"  {name}: not run: {line}", flush=True)
            if isinstance(exc, SetupError):
                for detail in exc.args[1][-6:]:
                    print(f"    | {detail[:200]}", flush=True)
            paths.append(PathUnderTest(name, not_run=str(line).splitlines()[0][:200]))
            continue
        print(f"  {name}: ready on 127.0.0.1:{path.port} in {time.monotonic() - began:.1f} s",
              flush=True)
        paths.append(path)
    return paths


def plan_memory(args: argparse.Namespace, nofile: int) -> str:
    """How many connections the memory scenario holds on each path, within RLIMIT_NOFILE
    (``nofile``): a proxy process needs two sockets per connection, the holder and the
    upstream one. A single-process proxy holds what one process can; a meshagent pair
    holds them all, with as many processes per agent (workers, sharing the listeners
    the way an agent on a host with that many cores does) as the descriptors need.
    Sets ``args.hold`` (single-process paths), ``args.hold_mesh`` and
    ``args.mesh_workers``; returns the line that says so."""
    wanted = args.hold
    per_process = max(10, (nofile - 200) // 2)
    args.hold = min(wanted, per_process)
    args.hold_mesh = min(wanted, max(10, nofile - 200))
    args.mesh_workers = -(-args.hold_mesh // per_process)
    if args.hold == wanted:
        return f"{wanted:,} connections"
    return (
        f"{args.hold_mesh:,} connections through the meshagent pairs ({args.mesh_workers} "
        f"processes per agent), {args.hold:,} through the others (RLIMIT_NOFILE {nofile:,} "
        "allows two sockets per connection in one proxy process)"
    )


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    # stolen measurements are taken again only while the rest of the run (the memory
    # scenario, the report) still fits in the deadline
    args.retry_until = began + args.deadline - args.hold_seconds - RETRY_RESERVE_SECONDS
    env = environment()
    nofile = raise_open_files_limit()
    hold_note = plan_memory(args, nofile)
    print(
        f"meshagent compare: python {env['python']}, {env['cpus']} CPUs, commit "
        f"{env['commit']}, {env['openssl']}; {'smoke' if args.smoke else 'full'} run, "
        f"{args.seconds:g} s per measurement, deadline {args.deadline:g} s",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="meshbench-compare-"))
    work_in(tmp)
    stops: list[Stopper] = []
    results: list[Measured] = []
    tools = Tools()
    upstream: Upstream | None = None
    status = 0
    paths: list[PathUnderTest] = []
    logs: list[str] = []
    try:
        with signals_as_exceptions(args.deadline):
            tools = find_tools(args.install, tmp)
            for note in tools.notes:
                print(f"  {note}", flush=True)
            upstream = start_upstream(tools, tmp, BULK_BYTES, nofile, stops)
            loadgen = (
                tools.versions.get("wrk", "wrk") if "wrk" in tools.paths
                else "bench/loadgen.py (Python; wrk not installed)"
            )
            print(f"upstream: {upstream.kind}; load generator: {loadgen}", flush=True)
            paths = start_paths(args, tools, tmp, upstream, nofile, stops)
            status = measure_all(args, tools, tmp, paths, results)
    except DeadlineReached:
        print(f"deadline of {args.deadline:g} s reached: stopping; the table shows what "
              "was measured", file=sys.stderr, flush=True)
        status = 3
    except KeyboardInterrupt:
        print("interrupted: stopping every process started", file=sys.stderr, flush=True)
        status = 130
    except SetupError as exc:
        print(f"setup failed: {exc.args[0]}", file=sys.stderr)
        for detail in exc.args[1]:
            print(f"  | {detail}", file=sys.stderr)
        status = 2
    finally:
        stop_all(stops)
        logs = agent_logs(paths)  # also when the deadline or a signal cut the run short
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    scenarios = [s.name for s in LOAD_SCENARIOS if s.name in args.scenarios]
    if MEMORY in args.scenarios:
        scenarios.append(MEMORY)
    print()
    print(
        f"{time.strftime('%Y-%m-%d')}, {env['cpus']} CPUs, python {env['python']}, "
        f"{env['openssl']}, TCP {env['tcp_congestion_control']}, commit {env['commit']}"
    )
    print(
        "upstream: " + (upstream.kind if upstream else "none")
        + "; load: " + (tools.versions.get("wrk", "wrk") if "wrk" in tools.paths
                       else "bench/loadgen.py")
        + "; peers: " + ", ".join(
            tools.versions[k] for k in ("haproxy", "consul") if k in tools.versions
        )
    )
    print(
        f"keep-alive: {KEEPALIVE.connections} connections; paced keep-alive: the same, "
        f"{PACED_KEEPALIVE.delay_ms} ms on average after each response; bursts: "
        f"{BURSTS.connections} requests at once every {BURSTS.burst_ms} ms; app closes: "
        f"keep-alive's load, the app closing after each answer; new conn: "
        f"{NEW_CONNECTION.connections} connections, Connection: close; paced conn: the "
        f"same, {PACED_CONNECTION.delay_ms} ms on average after each response; bulk: "
        f"{BULK_BYTES // MIB} MiB bodies, 1 connection; {args.seconds:g} s each, "
        f"{args.rounds} round{'s' if args.rounds > 1 else ''} (medians); memory: {hold_note}"
    )
    print()
    for line in render(results, scenarios):
        print(line)
    print()
    for line in details(results, scenarios):
        print(line)
    for line in logs:
        print(line)
    print()
    print(f"total run time {time.monotonic() - began:.0f} s")
    if args.json:
        print(json.dumps({
            "environment": env,
            "tools": tools.versions,
            "missing": tools.missing,
            "upstream": upstream.kind if upstream else None,
            "results": [rounded({**m.__dict__, "load": m.load.__dict__ if m.load else None,
                                 "cost": m.cost()}) for m in results],
        }, indent=2))
    return status


def measure_all(
    args: argparse.Namespace, tools: Tools, tmp: Path, paths: list[PathUnderTest],
    results: list[Measured],
) -> int:
    live = [p for p in paths if p.not_run is None]
    print("warming up (not measured)", flush=True)
    for path in live:
        measure_load(tools, tmp, path, KEEPALIVE, args.warmup)
    for scenario in LOAD_SCENARIOS:
        if scenario.name not in args.scenarios:
            continue
        for path in paths:
            if path.not_run is not None:
                results.append(Measured(scenario.name, path.name, not_run=path.not_run))
        for round_ in range(1, args.rounds + 1):
            # each round in another order: a path is not always measured right after
            # the same neighbour, nor always first
            shift = (round_ - 1) % len(live) if live else 0
            for path in live[shift:] + live[:shift]:
                m = measure_unstolen(
                    tools, tmp, path, scenario, args.seconds, round_, args.max_steal / 100,
                    args.retry_until,
                )
                results.append(m)
                round_label = f"round {round_}: " if args.rounds > 1 else ""
                print(
                    label(scenario.name, path.name) + f" {round_label}"
                    + (f"{fmt(m.rate())} req/s, {fmt(m.mb_per_s())} MB/s" if m.load
                       else "failed")
                    + (f", pair {fmt(m.cost())} {unit(scenario.name)[1]}" if m.cost() else "")
                    + (f", steal {100 * m.steal:.1f} %" if m.steal is not None else "")
                    + (f" (thrown away: {len(m.stolen)} with "
                       + ", ".join(f"{100 * v:.1f}" for v in m.stolen) + " %)"
                       if m.stolen else "")
                    + (f", errors {m.errors}" if m.errors else ""),
                    flush=True,
                )
    if MEMORY in args.scenarios:
        started: list[PathUnderTest] = []
        for path in list(paths):
            if path.not_run is not None:
                results.append(Measured(MEMORY, path.name, not_run=path.not_run))
                continue
            hold, workers_label = args.hold, ""
            if path.with_workers is not None:
                hold = args.hold_mesh
                if args.mesh_workers != path.workers:
                    # one process per agent cannot hold them all: a pair with more
                    try:
                        path = path.with_workers(args.mesh_workers)
                    except (SetupError, RuntimeError, OSError, ValueError) as exc:
                        why = exc.args[0] if exc.args else type(exc).__name__
                        results.append(Measured(MEMORY, path.name, errors={
                            f"{args.mesh_workers} processes per agent: {why}"[:160]: 1}))
                        continue
                    started.append(path)
                    workers_label = f" ({path.workers} processes per agent)"
                    measure_load(tools, tmp, path, KEEPALIVE, args.warmup)  # as the others were
            m = measure_memory(tmp, path, hold, args.hold_seconds)
            results.append(m)
            print(
                label(MEMORY, path.name) + f" {m.held:,} held{workers_label}"
                + (f", {fmt(m.cost())} KiB/conn (larger proxy)" if m.cost() is not None else "")
                + (f", errors {m.errors}" if m.errors else ""),
                flush=True,
            )
        paths.extend(started)  # their agents' logs are read at the end, too
    failed = [m for m in results if m.not_run is None and (m.errors or (
        m.load is None and m.scenario != MEMORY))]
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The meshagent pair vs. HAProxy and Consul's proxy, side by side."
    )
    parser.add_argument("--smoke", action="store_true",
                        help="seconds-long run for CI: 1 s per measurement, 100 held "
                        "connections, installs nothing")
    install = parser.add_mutually_exclusive_group()
    install.add_argument("--install", action="store_true", default=None,
                         help="apt-get install missing packages (default unless --smoke)")
    install.add_argument("--no-install", dest="install", action="store_false")
    parser.add_argument("--seconds", type=float, help="per measurement (default 4, smoke 1)")
    parser.add_argument("--rounds", type=int, help="measurements of each load scenario on "
                        "each path, in turn (default 3, smoke 1); the table gives medians")
    parser.add_argument("--max-steal", type=float, metavar="PERCENT",
                        help="a measurement during which the hypervisor took more than "
                        "this share of the host's CPU time (steal) is taken again, at most "
                        f"{STEAL_TRIES - 1} times; the one with the least steal counts "
                        "(default 2, smoke 100: never again)")
    parser.add_argument("--hold", type=int, help=f"memory: connections (default {HOLD:,}, "
                        "smoke 100)")
    parser.add_argument("--deadline", type=float, help="for the whole run, seconds "
                        "(default 900, smoke 240)")
    parser.add_argument("--paths", default=",".join(PATH_NAMES),
                        help="comma-separated subset of: " + ", ".join(PATH_NAMES))
    parser.add_argument("--scenarios", default=",".join(SCENARIO_NAMES),
                        help="comma-separated subset of: " + ", ".join(SCENARIO_NAMES))
    parser.add_argument("--profile", choices=("l4", "http"),
                        help="instead of the comparison: py-spy on that meshagent pair under "
                        "the keep-alive load (see profile.py)")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--profile-load", choices=("keep-alive", "new-conn"),
                        default="keep-alive",
                        help="with --profile: the load (new-conn: wrk with Connection: close, "
                        f"{NEW_CONNECTION.connections} connections)")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: C frames too (where a syscall's time goes)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = parser.parse_args(argv)
    if args.install is None:
        args.install = not args.smoke
    if args.seconds is None:
        args.seconds = 1.0 if args.smoke else 4.0
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 3
    if args.hold is None:
        args.hold = 100 if args.smoke else HOLD
    if args.max_steal is None:
        args.max_steal = 100.0 if args.smoke else 2.0
    if not 0 <= args.max_steal <= 100:
        parser.error(f"--max-steal {args.max_steal:g}: a share in percent, 0 to 100")
    if args.deadline is None:
        args.deadline = 240.0 if args.smoke else 900.0
    args.warmup = 1.0 if args.smoke else 2.0
    args.hold_seconds = 30.0 if args.smoke else 120.0
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for p in args.paths:
        if p not in PATH_NAMES:
            parser.error(f"--paths: unknown path {p!r}")
    for s in args.scenarios:
        if s not in SCENARIO_NAMES:
            parser.error(f"--scenarios: unknown scenario {s!r}")
    if not 0 < args.seconds <= 120:
        parser.error("--seconds must be in (0, 120]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if not 1 <= args.hold <= 100_000:
        parser.error("--hold must be 1..100000")
    return args


def main() -> int:
    args = parse_args()
    if args.profile:
        from profile_pair import profile

        if args.profile_load == "new-conn":
            return profile(args, NEW_CONNECTION.connections, close=True)
        return profile(args, KEEPALIVE.connections)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
