"""The stand-in upstream of ``compare.py`` when nginx is not installed.

    python bench/upstream.py --bulk-bytes N

A single-threaded ``socket`` + ``selectors`` HTTP/1.1 server on an ephemeral
127.0.0.1 port (it prints ``READY <port>`` once listening) that answers what nginx
answers in ``compare.py``: ``GET /small`` a 100-byte body, ``GET /closing`` the same
and then a close (an app with keep-alive off), ``GET /bulk`` a body of ``--bulk-bytes``
(100 MiB), anything else 404; every answer with Content-Length, kept alive unless the
request says ``Connection: close``. Requests are read head by head
(no bodies, no pipelining beyond what arrived). It stops on SIGTERM, when its parent
exits, or after an hour.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import sys
import time
from types import FrameType

LOOPBACK = "127.0.0.1"
SMALL_BODY = b"s" * 100
CHUNK = 256 * 1024
MAX_HEAD = 16 * 1024
MAX_SECONDS = 3600.0


def response_head(length: int, close: bool) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\nServer: bench-upstream\r\nContent-Type: text/plain\r\n"
        + b"Content-Length: %d\r\n" % length
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
    )


NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


class _Conn:
    __slots__ = ("body_left", "closing", "inbox", "out", "sock", "writing")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.out = bytearray()  # head (and small bodies) still to send
        self.body_left = 0  # bulk body bytes still to send after ``out``
        self.closing = False
        self.writing = False


def serve(bulk_bytes: int) -> int:
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
    filler = memoryview(b"b" * CHUNK)
    parent = os.getppid()

    def close(conn: _Conn) -> None:
        sel.unregister(conn.sock)
        conn.sock.close()

    def want(conn: _Conn, writing: bool) -> None:
        if conn.writing != writing:
            sel.modify(conn.sock, selectors.EVENT_WRITE if writing else selectors.EVENT_READ, conn)
            conn.writing = writing

    def flush(conn: _Conn) -> bool:
        """Send what is pending; False if the connection was closed."""
        try:
            while conn.out:
                sent = conn.sock.send(conn.out)
                del conn.out[:sent]
            while conn.body_left:
                sent = conn.sock.send(filler[: min(CHUNK, conn.body_left)])
                conn.body_left -= sent
        except BlockingIOError:
            want(conn, True)
            return True
        except OSError:
            close(conn)
            return False
        if conn.closing:
            close(conn)
            return False
        want(conn, False)
        return True

    def answer(conn: _Conn) -> bool:
        """Answer every complete request head in the inbox; False if closed."""
        while not conn.out and not conn.body_left:
            end = conn.inbox.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbox) > MAX_HEAD:
                    close(conn)
                    return False
                return True
            head = bytes(conn.inbox[:end]).lower()
            del conn.inbox[: end + 4]
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            conn.closing = b"\r\nconnection: close" in head or head.endswith(b"http/1.0")
            if target == b"/closing":  # an app with keep-alive off
                conn.closing = True
                conn.out += response_head(len(SMALL_BODY), True) + SMALL_BODY
            elif target == b"/small":
                conn.out += response_head(len(SMALL_BODY), conn.closing) + SMALL_BODY
            elif target == b"/bulk":
                conn.out += response_head(bulk_bytes, conn.closing)
                conn.body_left = bulk_bytes
            else:
                conn.out += NOT_FOUND
            if not flush(conn):
                return False
        return True

    def readable(conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            close(conn)
            return
        if not data:
            close(conn)
            return
        conn.inbox += data
        answer(conn)

    print(f"READY {listener.getsockname()[1]}", flush=True)
    deadline = time.monotonic() + MAX_SECONDS
    while not stopping and time.monotonic() < deadline and os.getppid() == parent:
        for key, _events in sel.select(0.5):
            conn = key.data
            if conn is None:
                for _ in range(256):
                    try:
                        sock, _addr = listener.accept()
                    except OSError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(sock, selectors.EVENT_READ, _Conn(sock))
            elif conn.writing:
                if flush(conn):
                    answer(conn)
            else:
                readable(conn)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="The stand-in upstream of compare.py.")
    parser.add_argument("--bulk-bytes", type=int, default=100 << 20)
    args = parser.parse_args()
    return serve(args.bulk_bytes)


if __name__ == "__main__":
    sys.exit(main())
