"""The load generator of ``compare.py`` when wrk is not installed, and the connection
holder of its memory scenario (wrk cannot hold idle connections).

    python bench/loadgen.py run  --port P --path /small --connections 32 --seconds 10 [--close]
                                 [--delay-ms D | --burst-ms B]
    python bench/loadgen.py hold --port P --path /small --connections 10000 --seconds 60

``run``: one thread, non-blocking sockets and ``selectors``; each connection sends
``GET <path>`` and reads the whole response (Content-Length; bodies are counted, not
kept) before the next request: no pipelining, and no think time unless ``--delay-ms``
(as compare.py's ``delay()`` for wrk: a wait between a response and the connection's
next request drawn at random, exponential with that mean). With ``--close`` every
request says ``Connection: close`` and goes on a new connection (the connect is part of
its latency). Requests in flight when the time is up are allowed to finish. Prints one
JSON line with the figures ``compare.py`` reads from wrk: requests, duration_us, bytes,
p50_us, p99_us and errors by kind. With ``--burst-ms`` (compare.py's bursts scenario,
which wrk cannot send: its connections do not wait for each other) every connection
sends one request at the same moment, every B ms; latency counts from the burst's
start, and the JSON line adds first_us and last_us: when a burst's first and last
answers came, medians over the bursts.

``hold``: opens ``--connections`` connections (at most 128 unanswered at a time), one
``GET <path>`` each, keeps each open once its response arrived, prints ``HELD <n>
<errors as JSON>`` when all are held or ``--seconds`` passed, waits for a line on
stdin, closes them all and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import selectors
import socket
import sys
import time
from collections import Counter

LOOPBACK = "127.0.0.1"
MAX_HEAD = 64 * 1024
REQUEST_TIMEOUT = 10.0
HOLD_WINDOW = 128
MAX_ERRORS = 1000


def request_bytes(path: str, close: bool) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: orders\r\nUser-Agent: meshbench\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
    )


def error_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}[{exc.errno}]"
    return type(exc).__name__


class Conn:
    """One connection and the response it is reading."""

    __slots__ = ("body_left", "close", "head", "sent_at", "sock", "status")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = bytearray()
        self.body_left = -1  # -1: still reading the head
        self.sent_at = 0.0  # 0: no request in flight
        self.status = 0
        self.close = False

    def feed(self, data: bytes | memoryview) -> bool:
        """Take bytes of the response; True once it is complete. ValueError on a
        response this client cannot read or bytes after it."""
        if self.body_left < 0:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_HEAD:
                    raise ValueError("response head too long")
                return False
            lines = bytes(self.head[:end]).split(b"\r\n")
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
            self.body_left = length - (len(self.head) - end - 4)
            del self.head[:]
        else:
            self.body_left -= len(data)
        if self.body_left < 0:
            raise ValueError("bytes after the response")
        return self.body_left == 0

    def answered(self, at: float, errors: Counter[str]) -> float | None:
        """Its response came whole at ``at``: the request's latency, or None when the
        status was not 200 (counted in ``errors``). Ready for the next request after."""
        latency = at - self.sent_at if self.status == 200 else None
        if latency is None:
            errors[f"HTTP {self.status}"] += 1
        self.reset()
        return latency

    def reset(self) -> None:
        self.head.clear()
        self.body_left = -1
        self.sent_at = 0.0


def receive(conn: Conn, buffer: bytearray) -> tuple[int, str | None, bool]:
    """Read what ``conn`` has into ``buffer``: the bytes read, why the connection is to
    be dropped (None: it is not) and whether its response is complete."""
    try:
        got = conn.sock.recv_into(buffer)
    except BlockingIOError:
        return 0, None, False
    except OSError as exc:
        return 0, error_name(exc), False
    if not got:
        return 0, "closed by the server", False
    if not conn.sent_at:
        return 0, "bytes nobody asked for", False
    view = memoryview(buffer)[:got]
    try:
        return got, None, conn.feed(bytes(view) if conn.body_left < 0 else view)
    except ValueError as exc:
        return 0, str(exc), False


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return sock


def run(
    port: int, path: str, connections: int, seconds: float, close: bool, delay: float = 0.0
) -> int:
    request = request_bytes(path, close)
    due = [0.0] * connections  # a paced slot's next request, once its think time is over
    sel = selectors.DefaultSelector()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    total_bytes = 0
    slots: list[Conn | None] = [None] * connections
    retry_at = [0.0] * connections

    def drop(n: int, conn: Conn, error: str | None) -> None:
        if error is not None:
            errors[error] += 1
        sel.unregister(conn.sock)
        conn.sock.close()
        slots[n] = None
        retry_at[n] = time.perf_counter() + (0.05 if error else 0.0)

    def start_request(n: int) -> None:
        """Open a connection for slot ``n`` if it has none, send the request."""
        t0 = time.perf_counter()
        conn = slots[n]
        if conn is None:
            try:
                conn = Conn(connect(port))
            except OSError as exc:
                errors[error_name(exc)] += 1
                retry_at[n] = time.perf_counter() + 0.05
                return
            sel.register(conn.sock, selectors.EVENT_READ, (n, conn))
            slots[n] = conn
        conn.sent_at = t0
        try:
            sent = conn.sock.send(request)
        except OSError as exc:
            drop(n, conn, error_name(exc))
            return
        if sent != len(request):  # an idle connection's send buffer is empty
            drop(n, conn, "short send")

    buffer = bytearray(256 * 1024)
    start = time.perf_counter()
    stop_at = start + seconds
    give_up_at = stop_at + REQUEST_TIMEOUT
    next_check = start + 0.2
    last = start
    for n in range(connections):
        start_request(n)
    while True:
        now = time.perf_counter()
        for n, at in enumerate(due):
            if at and now >= at:
                due[n] = 0.0
                if now < stop_at:
                    start_request(n)
        busy = any(c is not None and c.sent_at for c in slots)
        if now >= stop_at and not busy:
            break
        if now >= next_check or now >= give_up_at:
            next_check = now + 0.2
            give_up = now >= give_up_at or sum(errors.values()) > MAX_ERRORS
            for n, conn in enumerate(slots):
                if conn is not None and conn.sent_at and (
                    give_up or now - conn.sent_at > REQUEST_TIMEOUT
                ):
                    drop(n, conn, "timeout")
            if give_up:
                break
            for n, conn in enumerate(slots):
                if conn is None and not due[n] and now < stop_at and now >= retry_at[n]:
                    start_request(n)
        wait = min([0.05, *(at - now for at in due if at)])
        for key, _events in sel.select(max(0.0, wait)):
            n, conn = key.data
            got, error, complete = receive(conn, buffer)
            if error is not None:
                drop(n, conn, error)
                continue
            total_bytes += got
            if not complete:
                continue
            done = time.perf_counter()
            latency = conn.answered(done, errors)
            if latency is not None:
                latencies.append(latency)
                last = done
            if conn.close or close:
                drop(n, conn, None)
            if delay and done < stop_at:
                due[n] = done + random.expovariate(1 / delay)
            elif done < stop_at:
                start_request(n)
    for conn in slots:
        if conn is not None:
            conn.sock.close()
    print(
        json.dumps(
            {
                "requests": len(latencies),
                "duration_us": 1e6 * (max(last, min(time.perf_counter(), stop_at)) - start),
                "bytes": total_bytes,
                "p50_us": percentile(latencies, 50),
                "p99_us": percentile(latencies, 99),
                "errors": dict(errors),
            }
        ),
        flush=True,
    )
    return 0


def bursts(port: int, path: str, connections: int, seconds: float, period: float) -> int:
    """Every ``period`` seconds one request on each connection, all sent at once; the
    next burst starts when all answered, at the next tick (at once when the burst took
    longer than a period). A request's latency counts from its burst's start."""
    request = request_bytes(path, False)
    sel = selectors.DefaultSelector()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    firsts: list[float] = []
    lasts: list[float] = []
    total_bytes = 0
    slots: list[Conn | None] = [None] * connections
    buffer = bytearray(256 * 1024)

    def drop(n: int, conn: Conn, error: str | None) -> None:
        if error is not None:
            errors[error] += 1
        sel.unregister(conn.sock)
        conn.sock.close()
        slots[n] = None

    start = time.perf_counter()
    stop_at = start + seconds
    tick = last = start
    while tick < stop_at and sum(errors.values()) <= MAX_ERRORS:
        for n, conn in enumerate(slots):  # a connection lost in a burst is replaced
            if conn is None:
                try:
                    slots[n] = conn = Conn(connect(port))
                except OSError as exc:
                    errors[error_name(exc)] += 1
                    continue
                sel.register(conn.sock, selectors.EVENT_READ, (n, conn))
        time.sleep(max(0.0, tick - time.perf_counter()))
        began = time.perf_counter()
        for n, conn in enumerate(slots):
            if conn is None:
                continue
            conn.sent_at = began
            try:
                if conn.sock.send(request) != len(request):
                    drop(n, conn, "short send")
            except OSError as exc:
                drop(n, conn, error_name(exc))
        answered: list[float] = []
        give_up_at = began + REQUEST_TIMEOUT
        while any(c is not None and c.sent_at for c in slots):
            now = time.perf_counter()
            if now >= give_up_at:
                for n, conn in enumerate(slots):
                    if conn is not None and conn.sent_at:
                        drop(n, conn, "timeout")
                break
            for key, _events in sel.select(give_up_at - now):
                n, conn = key.data
                got, error, complete = receive(conn, buffer)
                if error is not None:
                    drop(n, conn, error)
                    continue
                total_bytes += got
                if not complete:
                    continue
                last = time.perf_counter()
                latency = conn.answered(last, errors)
                if latency is not None:
                    answered.append(latency)
                if conn.close:  # as it said it would: a new connection for the next burst
                    drop(n, conn, None)
        if answered:
            latencies.extend(answered)
            firsts.append(answered[0])
            lasts.append(answered[-1])
        tick = max(tick + period, time.perf_counter())
    for conn in slots:
        if conn is not None:
            conn.sock.close()
    print(json.dumps({
        "requests": len(latencies),
        "duration_us": 1e6 * (last - start),
        "bytes": total_bytes,
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "first_us": percentile(firsts, 50),
        "last_us": percentile(lasts, 50),
        "errors": dict(errors),
    }), flush=True)
    return 0


def percentile(values: list[float], p: float) -> float:
    """The ``p``th percentile of ``values`` (seconds) in µs; 0 when there are none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return 1e6 * ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def hold(port: int, path: str, connections: int, seconds: float) -> int:
    request = request_bytes(path, False)
    sel = selectors.DefaultSelector()
    errors: Counter[str] = Counter()
    held: list[socket.socket] = []
    waiting = 0
    opened = 0
    deadline = time.monotonic() + seconds
    while (opened < connections or waiting) and time.monotonic() < deadline:
        while opened < connections and waiting < HOLD_WINDOW and time.monotonic() < deadline:
            opened += 1
            try:
                sock = connect(port)
                sock.send(request)
            except OSError as exc:
                errors[error_name(exc)] += 1
                if sum(errors.values()) > MAX_ERRORS:
                    opened = connections
                continue
            sel.register(sock, selectors.EVENT_READ, Conn(sock))
            waiting += 1
        for key, _events in sel.select(0.05):
            conn = key.data
            try:
                data = conn.sock.recv(65536)
                if not data:
                    raise ConnectionResetError("closed by the server")
                if not conn.feed(data):
                    continue
                if conn.status != 200:
                    raise ValueError(f"HTTP {conn.status}")
            except BlockingIOError:
                continue
            except (OSError, ValueError) as exc:
                errors[str(exc) if isinstance(exc, ValueError) else error_name(exc)] += 1
                sel.unregister(conn.sock)
                conn.sock.close()
                waiting -= 1
                continue
            sel.unregister(conn.sock)
            held.append(conn.sock)
            waiting -= 1
    if waiting:
        errors["no response in time"] += waiting
    print(f"HELD {len(held)} {json.dumps(dict(errors))}", flush=True)
    sys.stdin.readline()  # the parent has read the proxies' memory
    for sock in held:
        with contextlib.suppress(OSError):
            sock.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="compare.py's load generator.")
    parser.add_argument("mode", choices=("run", "hold"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/small")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--close", action="store_true")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="run: wait this long on average (exponential) between a "
                        "response and the connection's next request")
    parser.add_argument("--burst-ms", type=float, default=0.0,
                        help="run: instead, one request on every connection at once, "
                        "a burst every this many ms")
    args = parser.parse_args()
    if args.mode == "hold":
        return hold(args.port, args.path, args.connections, args.seconds)
    if args.burst_ms:
        return bursts(args.port, args.path, args.connections, args.seconds, args.burst_ms / 1000)
    return run(
        args.port, args.path, args.connections, args.seconds, args.close, args.delay_ms / 1000
    )


if __name__ == "__main__":
    sys.exit(main())
