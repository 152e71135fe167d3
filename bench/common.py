"""What the benchmarks in this directory share: addresses, the mesh CA and identities,
starting the two agents, child processes (a line from their stdout, stopping them by
pid), CPU and memory accounting, and the helpers that format the report.

Not a script: ``l4.py``, ``http_keepalive.py`` and ``compare.py`` import it (``import
common``: Python puts a script's own directory first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import resource
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import psutil

from meshagent.demo.processes import Agent
from meshagent.pki.ca import create_ca, issue_leaf
from meshagent.pki.files import write_private_file, write_public_file

MESH = "bench"
LOOPBACK = "127.0.0.1"
WEB_ADDRESS = "127.0.0.2"
ORDERS_ADDRESS = "127.0.0.3"


class SetupError(Exception):
    """The benchmark could not start; ``str()`` is the line to show (plus details)."""


def print_setup_failure(exc: BaseException) -> None:
    line, details = (
        (exc.args[0], exc.args[1])
        if isinstance(exc, SetupError)
        else (f"{type(exc).__name__}: {exc}".splitlines()[0], [])
    )
    print(f"setup failed: {line}", file=sys.stderr)
    for detail in details:
        print(f"  | {detail}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# CPU accounting


def work_in(tmp: Path) -> None:
    """Make ``tmp`` the working directory of this run and of every process it starts.
    ``python -m meshagent`` imports from the working directory first: started from a
    checkout, the agents would run that checkout whatever PYTHONPATH says, and an A/B
    run (``PYTHONPATH=/path/to/other/checkout``) would measure one version twice."""
    os.chdir(tmp)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, its live descendants (worker processes)
    and the children it has already waited for."""
    proc = psutil.Process(pid)
    times = proc.cpu_times()
    total = float(times.user + times.system + times.children_user + times.children_system)
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += float(c.user + c.system)
    return total


def tree_rss(pid: int) -> int:
    """Resident memory (bytes) of a process and its live descendants."""
    proc = psutil.Process(pid)
    total = int(proc.memory_info().rss)
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += int(child.memory_info().rss)
    return total


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it);
    return the soft limit now in force. Raising the hard limit needs more than root in
    a container, so it is not tried."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class CpuSample:
    at: float
    agents: dict[str, tuple[float, float]]  # name -> (user, system)
    server: float
    client: float
    host_busy: float
    host_total: float

    @staticmethod
    def take(agents: dict[str, int], server: int, client: int | None = None) -> CpuSample:
        """A sample of the agents, the app server and the load generator (by default
        this process)."""
        per_agent = {}
        for name, pid in agents.items():
            times = psutil.Process(pid).cpu_times()
            per_agent[name] = (float(times.user), float(times.system))
        host = psutil.cpu_times()
        idle = host.idle + getattr(host, "iowait", 0.0)
        total = sum(host)
        return CpuSample(
            at=time.perf_counter(),
            agents=per_agent,
            server=cpu_seconds(server),
            client=cpu_seconds(os.getpid() if client is None else client),
            host_busy=total - idle,
            host_total=total,
        )


@dataclass
class CpuUse:
    seconds: float
    agents: float
    agents_split: dict[str, dict[str, float]]
    server: float
    client: float
    host_busy_percent: float  # of all CPUs of the host, during the measurement

    @staticmethod
    def between(a: CpuSample, b: CpuSample) -> CpuUse:
        split = {
            name: {
                "user": b.agents[name][0] - a.agents[name][0],
                "system": b.agents[name][1] - a.agents[name][1],
            }
            for name in a.agents
        }
        total = b.host_total - a.host_total
        return CpuUse(
            seconds=b.at - a.at,
            agents=sum(v["user"] + v["system"] for v in split.values()),
            agents_split=split,
            server=b.server - a.server,
            client=b.client - a.client,
            host_busy_percent=100 * (b.host_busy - a.host_busy) / total if total > 0 else 0.0,
        )


def add_splits(splits: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per-agent user/system seconds, summed over measurements."""
    total: dict[str, dict[str, float]] = {}
    for split in splits:
        for name, kinds in split.items():
            for kind, value in kinds.items():
                total.setdefault(name, {}).setdefault(kind, 0.0)
                total[name][kind] += value
    return total


# --------------------------------------------------------------------------------------
# Load


@dataclass
class Load:
    """What one measurement did: units done (bytes, connections, requests, round trips)."""

    units: float
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds
    errors: Counter[str] = field(default_factory=Counter)


# --------------------------------------------------------------------------------------
# Child processes


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line from a child's stdout (a pipe), or what came before ``timeout`` passed
    or the pipe closed. Reads byte by byte, so nothing after the line is consumed."""
    assert proc.stdout is not None
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            byte = os.read(proc.stdout.fileno(), 1)
            if not byte:
                break
            line += byte
    return line


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5) -> None:
    """Stop a child by its pid: SIGTERM, SIGKILL after ``timeout``; wait for it and close
    the pipes this side holds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def stop_all(stops: list[Callable[[], object]]) -> None:
    """Stop every process started, newest first, each by its pid; not interruptible by
    Ctrl-C (a second one would leave processes behind)."""
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        while stops:
            with contextlib.suppress(Exception):
                stops.pop()()
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def error_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}[{exc.errno}]"
    return type(exc).__name__


# --------------------------------------------------------------------------------------
# Setup: identities and the two agents


class Server(Protocol):
    @property
    def pid(self) -> int: ...

    @property
    def port(self) -> int: ...

    def stop(self) -> object: ...


@dataclass
class Setup:
    tmp: Path
    server: Server | None = None
    agents: list[Agent] = field(default_factory=list)
    outbound_port: int = 0

    def stop(self) -> None:
        for agent in reversed(self.agents):
            with contextlib.suppress(Exception):
                agent.stop(timeout=10)
        if self.server is not None:
            with contextlib.suppress(Exception):
                self.server.stop()


def tail(path: Path, lines: int = 12) -> list[str]:
    try:
        return path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return []


def write_identities(tmp: Path) -> dict[str, dict[str, str]]:
    now = datetime.now(UTC)
    ca = create_ca(MESH, now=now)
    write_public_file(tmp / "ca.pem", ca.cert_pem)
    tls: dict[str, dict[str, str]] = {}
    for service in ("web", "orders"):
        leaf = issue_leaf(ca, MESH, service, now=now, ttl=timedelta(days=30))  # no expiry warnings
        write_public_file(tmp / f"{service}.pem", leaf.cert_pem)
        write_private_file(tmp / f"{service}-key.pem", leaf.key_pem)
        tls[service] = {
            "ca": str(tmp / "ca.pem"),
            "cert": str(tmp / f"{service}.pem"),
            "key": str(tmp / f"{service}-key.pem"),
        }
    return tls


def agent_configs(
    tls: dict[str, dict[str, str]],
    *,
    inbound_port: int,
    outbound_port: int,
    app_port: int,
    protocol: str | None = None,
    max_connections: int | None = None,
    workers: int = 1,
) -> dict[str, dict[str, Any]]:
    """The orders agent (an inbound to the app on 127.0.0.3) and the web agent (an
    outbound on 127.0.0.1 with the orders inbound as its fixed endpoint): warning-level
    log, no admin endpoint, no Consul. ``protocol`` is set on both listeners when given
    (else the default, tcp); ``max_connections`` per listener when given (else the
    agent's default). One process per agent (``workers = 1``) unless told otherwise,
    like the one-thread HAProxy and Consul sides it is compared with: the figure is CPU
    per unit of work."""
    limits: dict[str, Any] = {"drain_timeout": "2s"}
    if max_connections is not None:
        limits["max_connections"] = max_connections
    common: dict[str, Any] = {
        "log": {"level": "warning"},
        "admin": "",
        "workers": workers,
        "limits": limits,
    }
    listener = {} if protocol is None else {"protocol": protocol}
    orders = {
        "mesh": MESH,
        "node": "bench-orders",
        "address": ORDERS_ADDRESS,
        "tls": tls["orders"],
        **common,
        "inbound": [{"service": "orders", "port": inbound_port, "app_port": app_port, **listener}],
    }
    web = {
        "mesh": MESH,
        "node": "bench-web",
        "address": WEB_ADDRESS,
        "tls": tls["web"],
        **common,
        "outbound": [
            {
                "service": "orders",
                "port": outbound_port,
                "source": "web",
                "endpoints": [f"{ORDERS_ADDRESS}:{inbound_port}"],
                **listener,
            }
        ],
    }
    return {"orders": orders, "web": web}


def start_agents(setup: Setup, configs: dict[str, dict[str, Any]]) -> None:
    """Start the agents in order (the inbound side first), each ready (READY=1) within
    20 s, else SetupError with the last lines of its log."""
    for name, config in configs.items():
        agent = Agent(config, setup.tmp, name)
        setup.agents.append(agent)
        try:
            agent.wait_for("READY=1", timeout=20)
        except RuntimeError:
            code = agent.proc.poll()
            what = "did not become ready within 20 s" if code is None else f"exited ({code})"
            raise SetupError(
                f"agent {name} {what}; the last lines of its log:", tail(agent.log_path)
            ) from None


_LOG_FIELD = re.compile(r'(event|error)=("(?:[^"\\]|\\.)*"|\S+)')


def log_summary(path: Path, top: int = 2) -> tuple[int, list[tuple[int, str]]]:
    """An agent's log (the benchmarks run agents at ``warning``): how many lines, and
    the ``top`` most frequent kinds (event and error), each with its count."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return 0, []
    kinds: Counter[str] = Counter()
    for line in lines:
        fields = dict(_LOG_FIELD.findall(line))
        kind = ": ".join(v.strip('"') for v in (fields.get("event"), fields.get("error")) if v)
        kinds[kind or line[:120]] += 1
    return len(lines), [(n, kind) for kind, n in kinds.most_common(top)]


def describe_log(summary: tuple[int, list[tuple[int, str]]]) -> str:
    """A ``log_summary`` as one line's end: "N line(s) at warning or above, most: Nx
    kind; ..."."""
    count, kinds = summary
    what = "; ".join(f"{n:,}x {kind[:160]}" for n, kind in kinds)
    return f"{count:,} line(s) at warning or above" + (f", most: {what}" if what else "")


def agent_warnings(setup: Setup) -> dict[str, str]:
    """Per agent of ``setup`` that logged anything (at warning or above, the level the
    benchmarks run agents at): ``describe_log``. Read before ``setup.stop``."""
    summaries = {a.name: log_summary(a.log_path) for a in setup.agents}
    return {name: describe_log(summary) for name, summary in summaries.items() if summary[0]}


def print_agent_warnings(warnings: dict[str, str]) -> None:
    for name, described in warnings.items():
        print(f"  agent {name} logged {described}")


# --------------------------------------------------------------------------------------
# Figures and the report


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def times(value: float | None) -> str:
    return "-" if value is None else f"{fmt(value)}x"


def render_table(table: list[list[str]], left: int) -> list[str]:
    """A header row and data rows as aligned text: the first ``left`` columns flush
    left, the others flush right, a dashed line under the header."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = []
    for n, line in enumerate(table):
        cells = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(line)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def rounded(value: Any) -> Any:
    """``value`` with floats kept to 6 significant digits, for JSON."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "commit": commit(),
        "openssl": __import__("ssl").OPENSSL_VERSION,
        "tcp_congestion_control": congestion_control(),
    }


def congestion_control() -> str:
    """The host's default TCP congestion control, which every path's sockets get: with
    bbr each sender paces, a timer per segment even on loopback (docs/performance.md)."""
    try:
        with open("/proc/sys/net/ipv4/tcp_congestion_control", encoding="ascii") as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"
