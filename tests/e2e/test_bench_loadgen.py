"""bench/loadgen.py's bursts (compare.py's bursts scenario): every connection sends its
request at the same moment, and the next burst waits for the last answer."""

from __future__ import annotations

import json
import selectors
import socket
import subprocess
import sys
import threading
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
CONNECTIONS = 8
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class BarrierServer:
    """Answers nothing until a request came on each of CONNECTIONS connections, then
    all of them at once: a client that waits for an answer before it sends on another
    connection gets none (its requests time out). Counts the bursts it answered."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bursts = 0
        self.stray = 0  # requests on a connection that already had one in the burst
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ)
        pending: dict[socket.socket, bytes] = {}
        asked: set[socket.socket] = set()
        while not self._stop.is_set():
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.listener:
                    conn, _ = self.listener.accept()
                    sel.register(conn, selectors.EVENT_READ)
                    pending[conn] = b""
                    continue
                data = sock.recv(65536)
                if not data:
                    sel.unregister(sock)
                    pending.pop(sock, None)
                    asked.discard(sock)
                    sock.close()
                    continue
                pending[sock] += data
                while b"\r\n\r\n" in pending[sock]:
                    _, _, pending[sock] = pending[sock].partition(b"\r\n\r\n")
                    if sock in asked:
                        self.stray += 1
                    asked.add(sock)
            if len(asked) == CONNECTIONS:
                self.bursts += 1
                for sock in asked:
                    sock.sendall(RESPONSE)
                asked.clear()
        for sock in pending:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.listener.close()


def test_a_burst_sends_on_every_connection_before_any_answer() -> None:
    server = BarrierServer()
    try:
        done = subprocess.run(
            [
                sys.executable, str(BENCH / "loadgen.py"), "run", "--port", str(server.port),
                "--path", "/small", "--connections", str(CONNECTIONS), "--seconds", "0.5",
                "--burst-ms", "20",
            ],
            capture_output=True, text=True, timeout=60, check=False,
        )
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["errors"] == {}
    assert server.stray == 0
    assert server.bursts, "no burst was answered"
    assert figures["requests"] == CONNECTIONS * server.bursts
    # the next burst waits for the last answer of this one, and starts at a tick:
    # 0.5 s holds 25 ticks of 20 ms (one more for rounding), not the hundreds of a
    # client that sends again as soon as it has an answer
    assert server.bursts <= 26
    assert 0 < figures["first_us"] <= figures["last_us"]
    assert figures["p50_us"] <= figures["p99_us"]
