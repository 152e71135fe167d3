"""TCP on the socket: the plaintext legs of the data path (the local app's side).

``trio.SocketStream`` wraps every call in a conflict detector and an error-translating
context manager, and goes through ``trio.socket``'s non-blocking helper; on small
messages (keep-alive HTTP, request/response over L4) that costs as much as the system
call itself. ``PlainSocketStream`` calls the non-blocking socket directly and waits with
trio's readiness waits, as ``SslSocketStream`` does for TLS:

* Try first, wait after: ``recv``/``send`` are tried at once; only ``BlockingIOError``
  leads to ``wait_readable``/``wait_writable``. A call that did not wait still passes a
  checkpoint (``checkpoint_if_cancelled`` before, ``cancel_shielded_checkpoint`` after),
  so a busy connection cannot starve the others and a cancellation is seen.
* One task may receive while another sends (the pumps of a splice, an HTTP request body
  going up while its response comes down); trio allows one waiter per direction.
* Errors are those of ``trio.SocketStream``: ``trio.BrokenResourceError`` from an
  ``OSError``, ``trio.ClosedResourceError`` once closed.
* No ``trio.SocketStream`` is made at all: the listener accepts, and ``open_tcp``
  connects, plain sockets (``tune``), which this takes over; ``aclose`` (or ``close``,
  at once) closes the socket, once. An idle proxied connection then holds no trio
  stream, socket wrapper or conflict detector per end.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import select
import socket
from collections.abc import Awaitable, Callable

import trio

DEFAULT_RECEIVE = 64 * 1024
_NOTSENT_LOWAT = 16 * 1024  # trio.SocketStream's


def tune(sock: socket.socket) -> socket.socket:
    """Set a connected, non-blocking TCP socket's options for the data path, those
    ``trio.SocketStream`` sets: ``TCP_NODELAY`` (a small message goes at once) and
    ``TCP_NOTSENT_LOWAT`` 16 KiB (writable only while little waits unsent). Returns it."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, _NOTSENT_LOWAT)
    return sock


async def open_tcp(host: str, port: int) -> socket.socket:
    """Connect to ``host:port``: a connected socket, ``tune``-d, that the caller owns
    (``PlainSocketStream(sock)`` or ``SslSocketStream.wrap(sock, ...)`` take it over).
    For an IP literal (an app's 127.0.0.1, a catalog's endpoint) this is one
    non-blocking ``connect`` and a wait, without ``trio.open_tcp_stream``'s resolver
    call and happy-eyeballs nursery, which cost a tenth of an agent's CPU per new L4
    stream; a name goes through ``trio.open_tcp_stream``. A cancel point.

    Raises:
        OSError: the connect failed (refused, unreachable, ...).
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        stream = await trio.open_tcp_stream(host, port)
        named = socket.socket(fileno=stream.socket.detach())
        named.setblocking(False)
        return tune(named)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        code = sock.connect_ex((host, port))
        if code == errno.EINPROGRESS:
            # On loopback the handshake completes inside connect(2), though a
            # non-blocking socket still says EINPROGRESS: one poll then spares trio's
            # wait (its registration of a new descriptor is two epoll_ctl calls, one
            # failing) and a trip through the scheduler.
            if fd_ready(sock.fileno(), select.POLLOUT):
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        else:
            await trio.lowlevel.checkpoint()
        if code:
            raise OSError(code, os.strerror(code))
        return tune(sock)
    except BaseException:
        sock.close()
        raise


def fd_ready(fd: int, events: int) -> bool:
    """True if ``fd`` has one of ``events`` (``select.POLLIN``: a read would not block,
    bytes, EOF or an error; ``select.POLLOUT``: a write would not, or a connect in
    progress has ended) now. ``poll``, not ``select``: select refuses descriptors from
    1024 on, which a busy agent has."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))


class PlainSocketStream(trio.abc.HalfCloseableStream):
    """A TCP connection over a non-blocking socket, called directly."""

    __slots__ = ("_eof", "_sock", "_waits")

    def __init__(self, sock: socket.socket) -> None:
        """Take ``sock``: a connected, non-blocking socket (``open_tcp``'s, an accepted
        one), closed by ``aclose``. Only this stream's calls may wait on its descriptor
        through trio (``aclose`` wakes those)."""
        self._sock = sock
        self._waits = 0  # this stream's tasks in trio's readiness waits now
        self._eof = False  # send_eof was called

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes``; ``b""`` at end of stream. A cancel point."""
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        sock = self._sock
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            data = sock.recv(max_bytes)
        except BlockingIOError:
            pass
        except OSError as exc:
            raise self._broken(exc) from exc
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return data
        while True:
            await self._wait(trio.lowlevel.wait_readable)
            try:
                return sock.recv(max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise self._broken(exc) from exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """All of ``data``; waits while the peer is slow. A cancel point."""
        sock = self._sock
        await trio.lowlevel.checkpoint_if_cancelled()
        view = memoryview(data)
        total = len(view)
        if not total and (self._eof or sock.fileno() == -1):  # not even nothing
            raise self._broken(None)
        sent = 0
        waited = False
        while sent < total:
            try:
                sent += sock.send(view[sent:])
            except BlockingIOError:
                waited = True
                await self._wait(trio.lowlevel.wait_writable)
            except OSError as exc:
                raise self._broken(exc) from exc
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait(trio.lowlevel.wait_writable)

    async def send_eof(self) -> None:
        """Half-close: a FIN to the peer (again: nothing). A cancel point."""
        await trio.lowlevel.checkpoint()
        if self._eof and self._sock.fileno() != -1:
            return
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._broken(exc) from exc
        self._eof = True

    async def aclose(self) -> None:
        """``close``, then a checkpoint. A cancel point; closes even when cancelled."""
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close the descriptor now (idempotent); not a cancel point. The data path's
        cleanup calls this (directly, or through ``sslsocket.close_now`` for a stream
        of any type) where
        ``trio.aclose_forcefully`` would cost a cancel scope, a trip through the
        scheduler and a raised ``Cancelled`` for the same result.

        A task of this stream waiting for readiness is woken (``ClosedResourceError``).
        With none, trio is not told: it holds nothing of a descriptor no task waits on
        (the kernel drops it from trio's epoll set on close), and ``notify_closing``
        would cost an ``epoll_ctl`` that fails, for most connections."""
        if self._sock.fileno() != -1:
            if self._waits:
                trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        if self._sock.fileno() == -1:
            raise trio.ClosedResourceError("the connection was closed")
        self._waits += 1
        try:
            await wait(self._sock)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the connection was closed") from None
        finally:
            self._waits -= 1

    def _broken(
        self, exc: OSError | None
    ) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self._sock.fileno() == -1:
            return trio.ClosedResourceError("the connection was closed")
        if self._eof and (exc is None or exc.errno == errno.EPIPE):
            return trio.ClosedResourceError("cannot send after sending EOF")
        return trio.BrokenResourceError(f"socket connection broken: {exc}")
