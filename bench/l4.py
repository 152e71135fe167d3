"""Layer-4 benchmark: a direct loopback connection vs. the two-agent mTLS path.

    python bench/l4.py [--quick] [--seconds N] [--rounds N] [--bulk-mib N] [--json] [--keep]

Everything runs on this host, on loopback:

    direct:  load generator -> app server (127.0.0.1)
    mesh:    load generator -> web agent outbound (127.0.0.1:P)
                -> mTLS -> orders agent inbound (127.0.0.3) -> app server

The app server is a plain ``socket`` + ``selectors`` process started from this file
(``--serve``); the first byte of each connection picks what it does:

    D  discard until end of stream, then answer the byte count (8 bytes) and close
    R  read the request until end of stream, answer 100 bytes and close
    E  echo every byte; close at end of stream

Scenarios, each measured for both paths, side by side, in alternating order:

    bulk     4 connections stream 1 GiB (quick: 256 MiB) one way to the     MB/s
             discard server, half-close, wait for its count
    connect  16 workers: connect, 100-byte request, half-close, 100-byte    conn/s
             reply, close; for --seconds (default 10, quick 3)
    echo     one kept-alive connection, 1 KiB ping-pong for --seconds / 2   round trips/s

CPU is read from ``psutil`` before and after each measurement, for the two agents
together (the figure this benchmark is about), the app server and the load generator
(this process) separately. See bench/README.md for how to read the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from common import (
    LOOPBACK,
    ORDERS_ADDRESS,
    CpuSample,
    CpuUse,
    Load,
    Setup,
    SetupError,
    add_splits,
    agent_configs,
    agent_warnings,
    environment,
    error_name,
    fmt,
    percentile,
    print_agent_warnings,
    print_setup_failure,
    ratio,
    read_line,
    render_table,
    rounded,
    start_agents,
    stop_process,
    tail,
    times,
    work_in,
    write_identities,
)

from meshagent.demo.ports import free_port

MODE_DISCARD = ord("D")
MODE_REPLY = ord("R")
MODE_ECHO = ord("E")
REQUEST = b"R" + b"q" * 99  # 100 bytes, mode byte included
REPLY = b"r" * 100
PING = b"p" * 1024
MIB = 1 << 20
GIB = 1 << 30

BULK_CONNECTIONS = 4
BULK_CHUNK = 256 * 1024
CPS_WORKERS = 16
ECHO_MAX = 1_000_000  # ping-pongs per measurement, at most
SERVER_MAX_SECONDS = 3600.0  # the app server never outlives a forgotten run by more


# --------------------------------------------------------------------------------------
# The app server (a separate process: ``python bench/l4.py --serve``)


class _Conn:
    __slots__ = ("closing", "count", "mode", "out", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mode = 0
        self.count = 0
        self.out = bytearray()
        self.closing = False
        self.writing = False  # registered for EVENT_WRITE instead of EVENT_READ


def serve(max_seconds: float) -> int:
    """Serve on an ephemeral 127.0.0.1 port until SIGTERM, the parent's exit or
    ``max_seconds``; print ``READY <port>`` once listening."""
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((LOOPBACK, 0))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    parent = os.getppid()

    def close(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()

    def flush(conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out) if conn.out else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            close(conn)
            return
        del conn.out[:sent]
        if conn.out:
            if not conn.writing:
                sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
                conn.writing = True
        elif conn.closing:
            close(conn)
        elif conn.writing:
            sel.modify(conn.sock, selectors.EVENT_READ, conn)
            conn.writing = False

    def readable(conn: _Conn) -> None:
        for _ in range(16):
            try:
                n = conn.sock.recv_into(buffer)
            except BlockingIOError:
                break
            except OSError:
                close(conn)
                return
            if n == 0:
                if conn.mode == MODE_DISCARD:
                    conn.out += struct.pack("!Q", conn.count)
                elif conn.mode == MODE_REPLY:
                    conn.out += REPLY
                conn.closing = True
                break
            start = 0
            if conn.mode == 0:
                conn.mode = buffer[0]
                start = 1
                if conn.mode not in (MODE_DISCARD, MODE_REPLY, MODE_ECHO):
                    close(conn)
                    return
            conn.count += n - start
            if conn.mode == MODE_ECHO and n > start:
                conn.out += view[start:n]
                break  # answer before reading more: the echo path stays bounded
        flush(conn)

    print(f"READY {listener.getsockname()[1]}", flush=True)
    deadline = time.monotonic() + max_seconds
    while not stopping and time.monotonic() < deadline and os.getppid() == parent:
        for key, _events in sel.select(0.5):
            conn = key.data
            if conn is None:
                for _ in range(256):
                    try:
                        sock, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(sock, selectors.EVENT_READ, _Conn(sock))
            elif conn.out:
                flush(conn)
            else:
                readable(conn)
    return 0


# --------------------------------------------------------------------------------------
# Processes and CPU accounting


class AppServer:
    """The app server process, started from this file."""

    def __init__(self, log: Path) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve"],
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.port = self._read_port(timeout=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_port(self, timeout: float) -> int:
        words = read_line(self.proc, timeout).split()
        if len(words) != 2 or words[0] != b"READY" or not words[1].isdigit():
            self.stop()
            raise SetupError("the app server did not start within 10 s", tail(self.log_path, 10))
        return int(words[1])

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


# --------------------------------------------------------------------------------------
# Load


def run_bulk(port: int, total_bytes: int, timeout: float) -> Load:
    """BULK_CONNECTIONS connections each stream total/BULK_CONNECTIONS bytes, half-close
    and wait for the server's count."""
    per_conn = total_bytes // BULK_CONNECTIONS
    chunk = memoryview(b"x" * BULK_CHUNK)
    barrier = threading.Barrier(BULK_CONNECTIONS + 1, timeout=30)
    done: list[int] = []
    ends: list[float] = []
    errors: Counter[str] = Counter()
    lock = threading.Lock()

    def stream() -> None:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=30) as sock:
                barrier.wait()
                sock.sendall(b"D")
                left = per_conn
                while left > 0:
                    n = min(left, BULK_CHUNK)
                    sock.sendall(chunk[:n])
                    left -= n
                sock.shutdown(socket.SHUT_WR)
                answer = b""
                for _ in range(16):
                    data = sock.recv(16)
                    if not data:
                        break
                    answer += data
                if len(answer) != 8 or struct.unpack("!Q", answer)[0] != per_conn:
                    raise ValueError(f"server counted {answer!r}, sent {per_conn}")
                with lock:
                    done.append(per_conn)
                    ends.append(time.perf_counter())
        except BaseException as exc:
            with lock:
                errors[error_name(exc)] += 1
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.abort()

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(BULK_CONNECTIONS)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    start = time.perf_counter()
    deadline = start + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.perf_counter()))
    if any(thread.is_alive() for thread in threads):
        errors["timeout"] += 1
    end = max(ends) if ends else time.perf_counter()
    return Load(units=float(sum(done)), seconds=end - start, errors=errors)


def run_connections(port: int, seconds: float) -> Load:
    """CPS_WORKERS workers: connect, request, half-close, read the reply, close; until
    ``seconds`` have passed."""
    barrier = threading.Barrier(CPS_WORKERS + 1, timeout=30)
    latencies: list[list[float]] = [[] for _ in range(CPS_WORKERS)]
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = [0.0]
    max_errors = 1000

    def worker(mine: list[float]) -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait()
        while time.perf_counter() < deadline[0]:
            t0 = time.perf_counter()
            try:
                with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
                    sock.sendall(REQUEST)
                    sock.shutdown(socket.SHUT_WR)
                    got = 0
                    for _ in range(100):
                        data = sock.recv(4096)
                        if not data:
                            break
                        got += len(data)
                if got != len(REPLY):
                    raise ValueError(f"reply of {got} bytes")
            except Exception as exc:
                with lock:
                    errors[error_name(exc)] += 1
                    if sum(errors.values()) > max_errors:
                        return
                time.sleep(0.01)
                continue
            mine.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(mine,), daemon=True) for mine in latencies]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    deadline[0] = start + seconds
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait()
    join_by = deadline[0] + 20
    for thread in threads:
        thread.join(max(0.0, join_by - time.perf_counter()))
    if any(thread.is_alive() for thread in threads):
        errors["timeout"] += 1
    end = time.perf_counter()
    flat = [x for mine in latencies for x in mine]
    return Load(units=float(len(flat)), seconds=end - start, latencies=flat, errors=errors)


def run_echo(port: int, seconds: float) -> Load:
    """One kept-alive connection: 1 KiB ping-pongs for ``seconds`` (at most ECHO_MAX)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    start = time.perf_counter()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"E")
            start = time.perf_counter()
            stop_at = start + seconds
            for _ in range(ECHO_MAX):
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    break
                sock.sendall(PING)
                got = 0
                for _ in range(1024):
                    data = sock.recv(len(PING) - got)
                    if not data:
                        raise ConnectionResetError("echo closed")
                    got += len(data)
                    if got == len(PING):
                        break
                latencies.append(time.perf_counter() - t0)
            sock.shutdown(socket.SHUT_WR)
    except Exception as exc:
        errors[error_name(exc)] += 1
    end = time.perf_counter()
    return Load(
        units=float(len(latencies)), seconds=end - start, latencies=latencies, errors=errors
    )


# --------------------------------------------------------------------------------------
# Setup


def start(setup: Setup) -> None:
    tmp = setup.tmp
    setup.server = AppServer(tmp / "app-server.log")
    tls = write_identities(tmp)
    inbound_port = free_port(ORDERS_ADDRESS)
    setup.outbound_port = free_port(LOOPBACK)
    configs = agent_configs(
        tls,
        inbound_port=inbound_port,
        outbound_port=setup.outbound_port,
        app_port=setup.server.port,
    )
    start_agents(setup, configs)
    # One request through each path before anything is measured.
    for path, port in (("direct", setup.server.port), ("mesh", setup.outbound_port)):
        probe = run_connections_once(port)
        if probe is not None:
            details = [f"{a.name}: {line}" for a in setup.agents for line in tail(a.log_path)]
            raise SetupError(f"a request over the {path} path failed: {probe}", details)


def run_connections_once(port: int) -> str | None:
    """One request/reply; None if it worked, else the error."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
            sock.sendall(REQUEST)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            for _ in range(100):
                data = sock.recv(4096)
                if not data:
                    break
                reply += data
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if reply == REPLY else f"unexpected reply {reply[:40]!r}"


# --------------------------------------------------------------------------------------
# Measurements and report


@dataclass
class Measured:
    scenario: str
    path: str
    load: Load
    cpu: CpuUse


SCENARIOS = ("bulk", "connect", "echo")
UNIT = {"bulk": "MB/s", "connect": "conn/s", "echo": "rt/s"}
CPU_UNIT = {"bulk": "s/GiB", "connect": "ms/conn", "echo": "µs/rt"}


def cpu_per_unit(scenario: str, cpu_seconds_used: float, units: float) -> float | None:
    """CPU per GiB (s), per connection (ms) or per round trip (µs)."""
    if units <= 0:
        return None
    if scenario == "bulk":
        return cpu_seconds_used / (units / GIB)
    if scenario == "connect":
        return 1e3 * cpu_seconds_used / units
    return 1e6 * cpu_seconds_used / units


def rate(scenario: str, units: float, seconds: float) -> float:
    if seconds <= 0:
        return 0.0
    return units / seconds / (1e6 if scenario == "bulk" else 1.0)


def measure(
    scenario: str, path: str, port: int, setup: Setup, args: argparse.Namespace
) -> Measured:
    agents = {agent.name: agent.pid for agent in setup.agents}
    assert setup.server is not None
    before = CpuSample.take(agents, setup.server.pid)
    if scenario == "bulk":
        load = run_bulk(port, args.bulk_mib * MIB, timeout=max(120.0, args.bulk_mib / 2))
    elif scenario == "connect":
        load = run_connections(port, args.seconds)
    else:
        load = run_echo(port, args.echo_seconds)
    after = CpuSample.take(agents, setup.server.pid)
    return Measured(scenario, path, load, CpuUse.between(before, after))


@dataclass
class Row:
    scenario: str
    path: str
    rounds: int
    units: float
    seconds: float
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    agents_cpu_s: float
    server_cpu_s: float
    client_cpu_s: float
    agents_per_unit: float | None
    total_per_unit: float | None
    host_busy_percent: float
    agents_split: dict[str, dict[str, float]]
    errors: dict[str, int]
    round_rates: list[float]
    round_ratios: list[float] = field(default_factory=list)  # rate / direct rate, per round


def summarise(results: list[Measured]) -> list[Row]:
    rows = []
    for scenario in SCENARIOS:
        for path in ("direct", "mesh"):
            mine = [m for m in results if m.scenario == scenario and m.path == path]
            if not mine:
                continue
            units = sum(m.load.units for m in mine)
            seconds = sum(m.load.seconds for m in mine)
            lat = [x for m in mine for x in m.load.latencies]
            agents = sum(m.cpu.agents for m in mine)
            server = sum(m.cpu.server for m in mine)
            client = sum(m.cpu.client for m in mine)
            busy = sum(m.cpu.host_busy_percent * m.cpu.seconds for m in mine)
            wall = sum(m.cpu.seconds for m in mine)
            split = add_splits([m.cpu.agents_split for m in mine])
            errors: Counter[str] = Counter()
            for m in mine:
                errors.update(m.load.errors)
            p50, p99 = percentile(lat, 50), percentile(lat, 99)
            rows.append(
                Row(
                    scenario=scenario,
                    path=path,
                    rounds=len(mine),
                    units=units,
                    seconds=seconds,
                    rate=rate(scenario, units, seconds),
                    p50_ms=None if p50 is None else 1e3 * p50,
                    p99_ms=None if p99 is None else 1e3 * p99,
                    agents_cpu_s=agents,
                    server_cpu_s=server,
                    client_cpu_s=client,
                    agents_per_unit=cpu_per_unit(scenario, agents, units),
                    total_per_unit=cpu_per_unit(scenario, agents + server + client, units),
                    host_busy_percent=busy / wall if wall > 0 else 0.0,
                    agents_split=split,
                    errors=dict(errors),
                    round_rates=[rate(scenario, m.load.units, m.load.seconds) for m in mine],
                )
            )
    for row in rows:
        direct = next(r for r in rows if r.scenario == row.scenario and r.path == "direct")
        row.round_ratios = [
            mine / theirs if theirs else 0.0
            for mine, theirs in zip(row.round_rates, direct.round_rates, strict=False)
        ]
    return rows


def _latency(scenario: str, ms: float | None) -> str:
    if ms is None:
        return "-"
    if scenario == "echo":
        return f"{fmt(ms * 1e3)} µs"
    return f"{fmt(ms)} ms"


def render(rows: list[Row]) -> list[str]:
    header = [
        "scenario",
        "path",
        "rate",
        "x direct",
        "p50",
        "p99",
        "p50 x",
        "agents CPU",
        "all CPU x",
        "host busy",
        "errors",
    ]
    table = [header]
    for row in rows:
        direct = next(r for r in rows if r.scenario == row.scenario and r.path == "direct")
        table.append(
            [
                row.scenario,
                row.path,
                f"{fmt(row.rate)} {UNIT[row.scenario]}",
                times(ratio(row.rate, direct.rate)),
                _latency(row.scenario, row.p50_ms),
                _latency(row.scenario, row.p99_ms),
                times(ratio(row.p50_ms, direct.p50_ms)),
                f"{fmt(row.agents_per_unit, 3)} {CPU_UNIT[row.scenario]}",
                times(ratio(row.total_per_unit, direct.total_per_unit)),
                f"{row.host_busy_percent:.0f}%",
                str(sum(row.errors.values())),
            ]
        )
    return render_table(table, left=2)


def summary_line(rows: list[Row]) -> str:
    parts = []
    for scenario in SCENARIOS:
        pair = {r.path: r for r in rows if r.scenario == scenario}
        if "direct" not in pair or "mesh" not in pair:
            continue
        mesh, direct = pair["mesh"], pair["direct"]
        text = f"{scenario} {times(ratio(mesh.rate, direct.rate))}"
        if scenario != "bulk":
            text += f" (p50 {times(ratio(mesh.p50_ms, direct.p50_ms))})"
        text += f", agents {fmt(mesh.agents_per_unit, 3)} {CPU_UNIT[scenario]}"
        parts.append(text)
    return "mesh vs direct: " + "; ".join(parts)


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    env = environment()
    print(
        f"meshagent L4 benchmark: python {env['python']}, {env['cpus']} CPUs, "
        f"commit {env['commit']}, {env['openssl']}"
    )
    print(
        f"bulk {args.bulk_mib} MiB over {BULK_CONNECTIONS} connections; connect "
        f"{CPS_WORKERS} workers for {args.seconds:g} s; echo 1 KiB ping-pong for "
        f"{args.echo_seconds:g} s; {args.rounds} round(s)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="meshbench-"))
    work_in(tmp)
    setup = Setup(tmp)
    results: list[Measured] = []
    try:
        try:
            start(setup)
        except (SetupError, RuntimeError, OSError) as exc:
            print_setup_failure(exc)
            return 2
        assert setup.server is not None
        ports = {"direct": setup.server.port, "mesh": setup.outbound_port}
        print(f"setup ready in {time.monotonic() - began:.1f} s; warming up", flush=True)
        for port in ports.values():  # not measured: imports, first handshakes, caches
            run_bulk(port, 4 * MIB * BULK_CONNECTIONS, timeout=60)
            run_connections(port, 0.5)
            run_echo(port, 0.2)
        for n in range(args.rounds):
            order = ("direct", "mesh") if n % 2 == 0 else ("mesh", "direct")
            for scenario in SCENARIOS:
                for path in order:
                    m = measure(scenario, path, ports[path], setup, args)
                    results.append(m)
                    bad = sum(m.load.errors.values())
                    print(
                        f"  round {n + 1}/{args.rounds} {scenario:7} {path:6} "
                        f"{fmt(rate(scenario, m.load.units, m.load.seconds))} "
                        f"{UNIT[scenario]} in {m.load.seconds:.1f} s"
                        + (f", {bad} errors {dict(m.load.errors)}" if bad else ""),
                        flush=True,
                    )
        warnings = agent_warnings(setup)
    finally:
        setup.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    rows = summarise(results)
    print()
    for line in render(rows):
        print(line)
    print()
    for row in rows:
        if row.path != "mesh":
            continue
        split = ", ".join(
            f"{name} {v['user']:.2f} user + {v['system']:.2f} sys"
            for name, v in sorted(row.agents_split.items())
        )
        spread = " ".join(f"{r:.3f}" for r in row.round_ratios)
        print(f"  {row.scenario:7} agents CPU s: {split}; mesh/direct per round: {spread}")
    print_agent_warnings(warnings)
    print()
    print(summary_line(rows))
    elapsed = time.monotonic() - began
    print(f"total run time {elapsed:.0f} s")
    if args.json:
        print(
            json.dumps(
                {
                    "environment": env,
                    "settings": {
                        "bulk_mib": args.bulk_mib,
                        "bulk_connections": BULK_CONNECTIONS,
                        "connect_workers": CPS_WORKERS,
                        "connect_seconds": args.seconds,
                        "echo_seconds": args.echo_seconds,
                        "rounds": args.rounds,
                    },
                    "units": {
                        "rate": UNIT,
                        "agents_per_unit": CPU_UNIT,
                        "total_per_unit": CPU_UNIT,
                    },
                    "rows": [rounded(row.__dict__) for row in rows],
                    "run_seconds": elapsed,
                },
                indent=2,
            )
        )
    failed = sum(sum(r.errors.values()) for r in rows)
    return 1 if failed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Direct loopback connection vs. the two-agent mTLS path."
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 20 s")
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="connect scenario length; echo runs half as long (default 10, quick 3)",
    )
    parser.add_argument(
        "--bulk-mib", type=int, default=None, help="bulk volume (default 1024, quick 256)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, certs)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if args.bulk_mib is None:
        args.bulk_mib = 256 if args.quick else 1024
    if not 4 <= args.bulk_mib <= 65536:
        parser.error("--bulk-mib must be 4..65536")
    args.echo_seconds = args.seconds / 2
    return args


def main() -> int:
    args = parse_args()
    if args.serve:
        return serve(SERVER_MAX_SECONDS)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
