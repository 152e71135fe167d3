"""HTTP benchmark: keep-alive requests, direct vs. through two HTTP agents.

    python bench/http_keepalive.py [--quick] [--seconds N] [--rounds N]
                                   [--connections N] [--json] [--keep]

Everything runs on this host, on loopback:

    direct:  load generator -> HTTP app (127.0.0.1)
    mesh:    load generator -> web agent, HTTP outbound (127.0.0.1:P)
                -> pooled keep-alive mTLS -> orders agent, HTTP inbound (127.0.0.3)
                -> pooled keep-alive -> HTTP app

The app is ``python -m meshagent.demo.apps http`` (trio + h11): GET answers a small JSON
body with Content-Length. The load generator is this file run as a separate process
(``--client``, hidden), so its CPU is not the benchmark's: one thread, non-blocking
sockets and ``selectors``, --connections keep-alive connections (default 16), each
sending ``GET /bench`` and reading the whole response before the next request (no
pipelining), for --seconds (default 10, quick 3). Both paths are measured in each
round, in alternating order.

CPU is read from ``psutil`` before and after each measurement: the two agents together
(the figure this benchmark is about, per request), the app and the load generator
separately. See bench/README.md for how to read the figures.
"""



from __future__ import annotations

import argparse
import json
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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
from meshagent.demo.processes import Process, start_app

REQUEST = b"GET /bench HTTP/1.1\r\nHost: orders\r\nUser-Agent: meshbench\r\n\r\n"
MAX_HEAD = 64 * 1024
CONNECTIONS = 16
REQUEST_TIMEOUT = 10.0  # one request without an answer this long is an error
MAX_ERRORS = 1000  # per measurement: the load generator gives up beyond
PATHS = ("direct", "mesh")


# --------------------------------------------------------------------------------------
# The load generator (a separate process: ``python bench/http_keepalive.py --client ...``)


class _Conn:
    """One keep-alive connection of the load generator and its request in flight."""

    __slots__ = ("buf", "close", "need", "sent_at", "sock", "status")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.need = -1  # bytes of head + body once the head is parsed
        self.sent_at = 0.0  # 0: no request in flight
        self.status = 0
        self.close = False

    def response_done(self) -> bool:
        """True once ``buf`` holds the whole response (then ``status``, ``close`` and
        ``need`` describe it). Raises ValueError on a response this client cannot read."""
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise ValueError("response head too long")
                return False
            lines = bytes(self.buf[:end]).split(b"\r\n")
            parts = lines[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ValueError("bad status line")
            self.status = int(parts[1])
            self.close = parts[0] == b"HTTP/1.0"
            length = -1
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip())
                elif name == b"connection":
                    self.close = b"close" in value.lower()
                elif name == b"transfer-encoding":
                    raise ValueError("chunked response")
            if length < 0:
                raise ValueError("response without content-length")
            self.need = end + 4 + length
        return len(self.buf) >= self.need


def client(port: int, connections: int, seconds: float, out: Path) -> int:
    """Open ``connections`` keep-alive connections, print READY, wait for GO on stdin,
    load the port for ``seconds``, let requests in flight finish, print DONE, wait for
    a line on stdin, write the result as JSON to ``out``."""
    sel = selectors.DefaultSelector()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    slots: list[_Conn | None] = [None] * connections
    retry_at = [0.0] * connections
    inflight = 0

    def open_conn(n: int) -> None:
        try:
            sock = socket.create_connection((LOOPBACK, port), timeout=5)
        except OSError as exc:
            errors[error_name(exc)] += 1
            retry_at[n] = time.perf_counter() + 0.05
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        sel.register(sock, selectors.EVENT_READ, (n, conn))
        slots[n] = conn

    def drop(n: int, conn: _Conn, error: str | None) -> None:
        nonlocal inflight
        if conn.sent_at:
            inflight -= 1
            conn.sent_at = 0.0
        if error is not None:
            errors[error] += 1
        sel.unregister(conn.sock)
        conn.sock.close()
        slots[n] = None
        retry_at[n] = time.perf_counter() + (0.05 if error else 0.0)

    def send(n: int, conn: _Conn) -> None:
        nonlocal inflight
        inflight += 1
        conn.sent_at = time.perf_counter()
        try:
            sent = conn.sock.send(REQUEST)
        except OSError as exc:
            drop(n, conn, error_name(exc))
            return
        if sent != len(REQUEST):  # an idle connection's send buffer is empty
            drop(n, conn, "short send")

    for n in range(connections):
        open_conn(n)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        return 1
    start = last = time.perf_counter()
    stop_at = start + seconds
    give_up_at = stop_at + REQUEST_TIMEOUT
    next_check = start + 0.5
    for n, conn in enumerate(slots):
        if conn is not None:
            send(n, conn)
    while True:
        now = time.perf_counter()
        if now >= stop_at and not inflight:
            break
        if now >= next_check or now >= give_up_at:  # stuck requests, lost connections
            next_check = now + 0.5
            give_up = now >= give_up_at or sum(errors.values()) > MAX_ERRORS
            for n, conn in enumerate(slots):
                if conn is None or not conn.sent_at:
                    continue
                if give_up or now - conn.sent_at > REQUEST_TIMEOUT:
                    drop(n, conn, "timeout")
            if give_up:
                break
            for n, conn in enumerate(slots):
                if conn is None and now < stop_at and now >= retry_at[n]:
                    open_conn(n)
                    fresh = slots[n]
                    if fresh is not None:
                        send(n, fresh)
        for key, _events in sel.select(0.1):
            n, conn = key.data
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                drop(n, conn, error_name(exc))
                continue
            if not data:
                drop(n, conn, "closed by the server")
                continue
            if not conn.sent_at:
                drop(n, conn, "bytes nobody asked for")
                continue
            conn.buf += data
            try:
                if not conn.response_done():
                    continue
            except ValueError as exc:
                drop(n, conn, str(exc))
                continue
            done = time.perf_counter()
            inflight -= 1
            if conn.status == 200:
                latencies.append(done - conn.sent_at)
                last = done
            else:
                errors[f"HTTP {conn.status}"] += 1
            conn.sent_at = 0.0
            extra = len(conn.buf) > conn.need
            del conn.buf[:]
            conn.need = -1
            if extra:
                drop(n, conn, "bytes after the response")
            elif conn.close:
                drop(n, conn, None)
            elif done < stop_at:
                send(n, conn)
    print("DONE", flush=True)
    sys.stdin.readline()  # the parent has read our CPU time
    for conn in slots:
        if conn is not None:
            conn.sock.close()
    out.write_text(
        json.dumps(
            {
                "requests": len(latencies),
                "seconds": last - start,
                "latencies_us": [round(x * 1e6, 1) for x in latencies],
                "errors": dict(errors),
            }
        )
    )
    return 0


# --------------------------------------------------------------------------------------
# Processes


@dataclass
class HttpApp:
    """The HTTP app process (``meshagent.demo.apps http``)."""

    process: Process
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop(timeout=10)


class LoadGenerator:
    """One run of the load generator against ``port``, in its own process."""

    def __init__(self, port: int, connections: int, seconds: float, tmp: Path, n: int) -> None:
        self.out = tmp / f"load-{n}.json"
        self.log_path = tmp / f"load-{n}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        args = ["--client", str(port), "--connections", str(connections)]
        args += ["--seconds", str(seconds), "--out", str(self.out)]
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, word: str, timeout: float) -> None:
        """Wait for a line ``word`` from the load generator; RuntimeError if it does not
        come within ``timeout``."""
        if read_line(self.proc, timeout).strip() != word.encode():
            raise RuntimeError(f"no {word} from the load generator within {timeout:g} s")

    def say(self, word: str) -> None:
        stdin: IO[bytes] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(word.encode() + b"\n")
        stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        self.proc.wait(timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the load generator exited ({self.proc.returncode})")
        data: dict[str, Any] = json.loads(self.out.read_text())
        return data

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


# --------------------------------------------------------------------------------------
# Setup


def get_once(port: int) -> tuple[int, dict[str, Any]]:
    """One GET on a fresh connection: the status and the JSON body."""
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(REQUEST)
        conn = _Conn(sock)
        while not conn.response_done():
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError("closed before the whole response")
            conn.buf += data
    head_end = conn.buf.find(b"\r\n\r\n") + 4
    body: dict[str, Any] = json.loads(bytes(conn.buf[head_end : conn.need]))
    return conn.status, body


def start(setup: Setup) -> None:
    tmp = setup.tmp
    process, app_port = start_app("http", tmp, name="orders")
    setup.server = HttpApp(process, app_port)
    tls = write_identities(tmp)
    inbound_port = free_port(ORDERS_ADDRESS)
    setup.outbound_port = free_port(LOOPBACK)
    configs = agent_configs(
        tls,
        inbound_port=inbound_port,
        outbound_port=setup.outbound_port,
        app_port=app_port,
        protocol="http",
    )
    start_agents(setup, configs)
    # One request through each path before anything is measured; the mesh one must
    # arrive with the caller's verified identity.
    for path, port in (("direct", app_port), ("mesh", setup.outbound_port)):
        try:
            status, body = get_once(port)
            problem = None if status == 200 else f"status {status}"
            if path == "mesh" and body.get("source") != "web":
                problem = f"the app saw source {body.get('source')!r}, not 'web'"
        except (OSError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            details = [f"{a.name}: {line}" for a in setup.agents for line in tail(a.log_path)]
            raise SetupError(f"a request over the {path} path failed: {problem}", details)


# --------------------------------------------------------------------------------------
# Measurements and report


@dataclass
class Measured:
    path: str
    load: Load
    cpu: CpuUse


def measure(
    path: str, port: int, setup: Setup, args: argparse.Namespace, seconds: float, n: int
) -> Measured:
    """One load generator run; its CPU, the agents' and the app's around the load."""
    agents = {agent.name: agent.pid for agent in setup.agents}
    assert setup.server is not None
    gen = LoadGenerator(port, args.connections, seconds, setup.tmp, n)
    try:
        try:
            gen.expect("READY", timeout=30)
            before = CpuSample.take(agents, setup.server.pid, gen.pid)
            gen.say("GO")
            gen.expect("DONE", timeout=seconds + REQUEST_TIMEOUT + 30)
            after = CpuSample.take(agents, setup.server.pid, gen.pid)
            gen.say("BYE")
            data = gen.result(timeout=30)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            print(f"  load generator failed: {exc}", file=sys.stderr)
            for line in tail(gen.log_path, 10):
                print(f"    | {line}", file=sys.stderr)
            failed = Load(0.0, seconds, errors=Counter({"load generator failed": 1}))
            empty = CpuSample.take(agents, setup.server.pid)
            return Measured(path, failed, CpuUse.between(empty, empty))
    finally:
        gen.stop()
    load = Load(
        units=float(data["requests"]),
        seconds=float(data["seconds"]),
        latencies=[x / 1e6 for x in data["latencies_us"]],
        errors=Counter(data["errors"]),
    )
    return Measured(path, load, CpuUse.between(before, after))


@dataclass
class Row:
    path: str
    rounds: int
    requests: int
    seconds: float
    rate: float  # requests/s
    p50_ms: float | None
    p99_ms: float | None
    agents_cpu_s: float
    app_cpu_s: float
    client_cpu_s: float
    agents_us_per_request: float | None
    app_us_per_request: float | None
    client_busy_percent: float  # of one CPU
    host_busy_percent: float
    agents_split: dict[str, dict[str, float]]
    errors: dict[str, int]
    round_rates: list[float]
    round_ratios: list[float] = field(default_factory=list)  # rate / direct rate, per round


def _per_request(seconds: float, requests: float) -> float | None:
    return 1e6 * seconds / requests if requests > 0 else None


def summarise(results: list[Measured]) -> list[Row]:
    rows = []
    for path in PATHS:
        mine = [m for m in results if m.path == path]
        if not mine:
            continue
        requests = sum(m.load.units for m in mine)
        seconds = sum(m.load.seconds for m in mine)
        lat = [x for m in mine for x in m.load.latencies]
        agents = sum(m.cpu.agents for m in mine)
        app = sum(m.cpu.server for m in mine)
        client = sum(m.cpu.client for m in mine)
        wall = sum(m.cpu.seconds for m in mine)
        busy = sum(m.cpu.host_busy_percent * m.cpu.seconds for m in mine)
        errors: Counter[str] = Counter()
        for m in mine:
            errors.update(m.load.errors)
        p50, p99 = percentile(lat, 50), percentile(lat, 99)
        rows.append(
            Row(
                path=path,
                rounds=len(mine),
                requests=int(requests),
                seconds=seconds,
                rate=requests / seconds if seconds > 0 else 0.0,
                p50_ms=None if p50 is None else 1e3 * p50,
                p99_ms=None if p99 is None else 1e3 * p99,
                agents_cpu_s=agents,
                app_cpu_s=app,
                client_cpu_s=client,
                agents_us_per_request=_per_request(agents, requests),
                app_us_per_request=_per_request(app, requests),
                client_busy_percent=100 * client / wall if wall > 0 else 0.0,
                host_busy_percent=busy / wall if wall > 0 else 0.0,
                agents_split=add_splits([m.cpu.agents_split for m in mine]),
                errors=dict(errors),
                round_rates=[
                    m.load.units / m.load.seconds if m.load.seconds > 0 else 0.0 for m in mine
                ],
            )
        )
    direct = next((r for r in rows if r.path == "direct"), None)
    for row in rows:
        theirs = direct.round_rates if direct is not None else []
        row.round_ratios = [
            a / b if b else 0.0 for a, b in zip(row.round_rates, theirs, strict=False)
        ]
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{fmt(value)} ms"


def render(rows: list[Row]) -> list[str]:
    header = [
        "path",
        "requests/s",
        "x direct",
        "p50",
        "p99",
        "p50 x",
        "agents CPU",
        "app CPU",
        "load gen",
        "host busy",
        "errors",
    ]
    table = [header]
    direct = next((r for r in rows if r.path == "direct"), None)
    for row in rows:
        table.append(
            [
                row.path,
                fmt(row.rate),
                times(ratio(row.rate, direct.rate if direct else None)),
                _ms(row.p50_ms),
                _ms(row.p99_ms),
                times(ratio(row.p50_ms, direct.p50_ms if direct else None)),
                f"{fmt(row.agents_us_per_request, 1)} µs/req",
                f"{fmt(row.app_us_per_request, 1)} µs/req",
                f"{row.client_busy_percent:.0f}%",
                f"{row.host_busy_percent:.0f}%",
                str(sum(row.errors.values())),
            ]
        )
    return render_table(table, left=1)


def summary_line(rows: list[Row]) -> str:
    pair = {r.path: r for r in rows}
    if "direct" not in pair or "mesh" not in pair:
        return "mesh vs direct: -"
    mesh, direct = pair["mesh"], pair["direct"]
    return (
        f"mesh vs direct: {times(ratio(mesh.rate, direct.rate))} requests/s "
        f"(p50 {times(ratio(mesh.p50_ms, direct.p50_ms))}, "
        f"p99 {times(ratio(mesh.p99_ms, direct.p99_ms))}), "
        f"agents {fmt(mesh.agents_us_per_request, 1)} µs CPU per request"
    )


def run(args: argparse.Namespace) -> int:
    began = time.monotonic()
    env = environment()
    print(
        f"meshagent HTTP benchmark: python {env['python']}, {env['cpus']} CPUs, "
        f"commit {env['commit']}, {env['openssl']}"
    )
    print(
        f"GET, {args.connections} keep-alive connections, one request at a time each, "
        f"for {args.seconds:g} s; {args.rounds} round(s)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="meshbench-http-"))
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
        runs = 0
        for path, port in ports.items():  # not measured: imports, pools, handshakes
            runs += 1
            warm = measure(path, port, setup, args, args.warmup_seconds, runs)
            if warm.load.errors:
                print(f"  warm-up {path}: errors {dict(warm.load.errors)}", flush=True)
        for n in range(args.rounds):
            order = PATHS if n % 2 == 0 else PATHS[::-1]
            for path in order:
                runs += 1
                m = measure(path, ports[path], setup, args, args.seconds, runs)
                results.append(m)
                bad = sum(m.load.errors.values())
                print(
                    f"  round {n + 1}/{args.rounds} {path:6} "
                    f"{fmt(m.load.units / m.load.seconds if m.load.seconds > 0 else 0.0)} "
                    f"requests/s in {m.load.seconds:.1f} s"
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
            f"{name} {fmt(_per_request(v['user'] + v['system'], row.requests), 1)} µs/req "
            f"({v['user']:.2f} user + {v['system']:.2f} sys s)"
            for name, v in sorted(row.agents_split.items())
        )
        spread = " ".join(f"{r:.3f}" for r in row.round_ratios)
        print(f"  agents CPU: {split}; mesh/direct requests/s per round: {spread}")
    for row in rows:
        if row.errors:
            print(f"  {row.path} errors: {row.errors}")
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
                        "connections": args.connections,
                        "seconds": args.seconds,
                        "warmup_seconds": args.warmup_seconds,
                        "rounds": args.rounds,
                        "request": REQUEST.decode(),
                    },
                    "units": {
                        "rate": "requests/s",
                        "latency": "ms",
                        "cpu_per_request": "µs",
                        "busy": "percent (load generator: of one CPU; host: of all CPUs)",
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
        description="HTTP keep-alive requests: direct vs. through two HTTP agents."
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of about 15 s")
    parser.add_argument(
        "--seconds", type=float, default=None, help="per measurement (default 10, quick 3)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, quick 1)")
    parser.add_argument(
        "--connections",
        type=int,
        default=CONNECTIONS,
        help=f"keep-alive connections of the load generator (default {CONNECTIONS})",
    )
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, certs)")
    parser.add_argument("--client", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 10.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if not 0 < args.seconds <= 600:
        parser.error("--seconds must be in (0, 600]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if not 1 <= args.connections <= 256:
        parser.error("--connections must be 1..256")
    args.warmup_seconds = min(1.0, args.seconds)
    return args


def main() -> int:
    args = parse_args()
    if args.client is not None:
        if args.out is None:
            return 2
        return client(args.client, args.connections, args.seconds, args.out)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
