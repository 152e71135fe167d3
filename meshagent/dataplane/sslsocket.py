"""TLS over a non-blocking ``ssl.SSLSocket``: the mTLS legs of the data path.

Why not ``trio.SSLStream``. trio's stream drives an ``ssl.SSLObject`` through two
``MemoryBIO`` buffers: every record is copied from the socket into Python bytes, into
the BIO, decrypted, and the ciphertext of every send is copied out of the BIO into
Python bytes again before it reaches the socket, with a Python-level retry loop around
each step. Here OpenSSL reads and writes the file descriptor itself (``SSL_read`` /
``SSL_write`` on a socket BIO), and trio only waits for readiness with
``trio.lowlevel.wait_readable`` / ``wait_writable``. Measured on loopback: about half
the CPU per GiB in both directions (see docs/architecture.md, "The data path").

Theory of operation. Every operation first tries the ``SSLSocket`` call without
blocking. ``SSLWantReadError`` means OpenSSL needs bytes from the peer, whatever the
call was (a send can need to read, and a receive can need to write: a TLS 1.3 key
update answer), so the task waits for the fd to become readable (or writable, for
``SSLWantWriteError``) and tries the same call again. Invariants:

* Never wait for readability while OpenSSL holds decrypted bytes (``pending()``): a
  receive always calls ``recv`` before it waits, and ``recv`` only asks to wait when
  nothing is buffered. ``is_readable()`` counts buffered bytes too.
* A send that OpenSSL started must be retried with the same bytes until it completes
  (OpenSSL refuses another buffer: "bad write retry"). A send interrupted in the middle
  (cancelled, or failed) therefore breaks the stream: every later send raises
  ``trio.BrokenResourceError``, as with ``trio.SSLStream``. A cancelled receive leaves
  nothing half done and does not break the stream.
* One task may receive while another sends (the two pumps of ``tcp_proxy.splice``).
  trio lets only one task wait for one direction of one fd; when a receive needs the
  fd writable while the sending task already waits for that (or the reverse), it
  parks until that task's wait ends, then retries.
* End of stream: ``b""`` only after the peer's close_notify. A peer that closes the TCP
  connection without one (killed, or closed forcefully) breaks the stream
  (``trio.BrokenResourceError``): for an agent the stream ends with an END frame or an
  HTTP message boundary, so an EOF without close_notify is a truncation.
* The file descriptor: ``wrap`` detaches it from the ``trio.SocketStream`` (which can
  then be closed or dropped harmlessly: it no longer owns a descriptor); from then on
  only this stream closes it, once, in ``aclose``.
* ``aclose`` sends close_notify when the socket takes it without waiting (and waits
  for writability otherwise, a cancel point: ``trio.aclose_forcefully`` gives that up
  at once), never waits for the peer's, then closes the fd. ``close`` is that forceful
  close as a plain call (``close_now``: the data path's cleanup).

TLS cannot half-close (a close_notify ends the session both ways), so there is no
``send_eof``: agents frame a half-close inside the session (``tcp_proxy.FramedSide``).
The first bytes of a permissive inbound are looked at with ``MSG_PEEK``
(``inbound._detect``), so they are still in the socket when this stream takes it.

Renegotiation is refused (``OP_NO_RENEGOTIATION``, ``dataplane/tls.py``); a peer that
insists gets an alert, and the stream breaks.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping

import trio

from meshagent.dataplane import tlssessions
from meshagent.dataplane.plainsocket import PlainSocketStream, fd_ready

# The largest receive_some without max_bytes; the proxies always pass their chunk size.
DEFAULT_RECEIVE = 64 * 1024
# A TLS record carries at most 16 KiB; a receive that got a whole one reads on while
# more is already there (bulk transfer), up to max_bytes, instead of going once round
# the pump and trio's scheduler per record.
_RECORD = 16 * 1024


class SslSocketStream(trio.abc.Stream):
    """A TLS connection over a non-blocking ``ssl.SSLSocket``; the subset of the
    ``trio.SSLStream`` API the data path uses. Build it with ``wrap``."""

    __slots__ = (
        "_broken",
        "_closed",
        "_handshake_done",
        "_on_session",
        "_reading",
        "_receiving",
        "_sending",
        "_sock",
        "_writing",
        "server_side",
    )

    def __init__(
        self,
        sock: ssl.SSLSocket,
        *,
        server_side: bool,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
    ) -> None:
        """Take ``sock`` (non-blocking, not yet handshaken); prefer ``wrap``."""
        self._sock = sock
        self.server_side = server_side
        self._on_session = on_session
        self._handshake_done = False
        self._broken = False
        self._closed = False
        self._receiving = False
        self._sending = False
        self._reading = _OneWaiter(trio.lowlevel.wait_readable)
        self._writing = _OneWaiter(trio.lowlevel.wait_writable)

    @classmethod
    def wrap(
        cls,
        plain: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        session: ssl.SSLSession | None = None,
        on_session: Callable[[ssl.SSLSession], None] | None = None,
    ) -> SslSocketStream:
        """TLS over ``plain``, a connected non-blocking socket (``open_tcp``'s, an
        accepted one), which this takes over: ``plain`` owns no descriptor afterwards,
        even when this fails (closing it is harmless). Not async; no handshake yet.

        Args:
            session: a client's earlier session with the same peer, made with this very
                ``context`` (a TLS 1.3 ticket), to resume.
            on_session: called once with the session when the first receive returned
                bytes, if it holds a ticket (TLS 1.3 servers send theirs after the
                handshake, so it is only known once something was read).
        Raises:
            OSError: the socket is closed.
            ValueError: ``session`` belongs to another context.
        """
        try:
            # wrap_socket takes the descriptor over, and closes it if it fails.
            sock = context.wrap_socket(
                plain,
                server_side=server_side,
                do_handshake_on_connect=False,
                suppress_ragged_eofs=False,
            )
        except BaseException:
            plain.close()
            raise
        if session is not None:
            try:
                tlssessions.resume(sock, session)
            except BaseException:
                sock.close()
                raise
        return cls(sock, server_side=server_side, on_session=on_session)

    # -- what the data path asks of a TLS stream ---------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLSocket:
        """The ``SSLSocket`` (for ``session``, ``version()``, ``cipher()``)."""
        return self._sock

    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed)."""
        return self._sock.fileno()

    def getpeercert(self) -> Mapping[str, object] | None:
        """The verified peer certificate, decoded (after the handshake)."""
        return self._sock.getpeercert()

    def selected_alpn_protocol(self) -> str | None:
        return self._sock.selected_alpn_protocol()

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session, resumable on a later connection to the same peer. With TLS
        1.3 the server's ticket arrives after the handshake, so a client has one worth
        keeping only once it read something."""
        return self._sock.session

    @property
    def pumpable(self) -> bool:
        """True when the C pump may take the connection over: handshake done, open,
        not broken, no call in progress."""
        return (
            self._handshake_done
            and not (self._closed or self._broken or self._sending or self._receiving)
        )

    def keep_session_with(self, on_session: Callable[[ssl.SSLSession], None]) -> None:
        """After the handshake, before the first receive: like ``wrap``'s ``on_session``."""
        self._on_session = on_session

    @property
    def wants_first_read(self) -> bool:
        """True while ``on_session`` waits for the first bytes received."""
        return self._on_session is not None

    def first_read(self) -> None:
        """The first bytes were received elsewhere (the C pump): offer the session."""
        self._offer_session()

    @property
    def session_reused(self) -> bool:
        return bool(self._sock.session_reused)

    def is_readable(self) -> bool:
        """True when a receive would not wait: decrypted bytes buffered in OpenSSL, or
        bytes (or EOF) on the socket. Not async, never blocks."""
        if self._closed:
            return True
        if self._sock.pending():
            return True
        return fd_ready(self._sock.fileno(), select.POLLIN)

    def is_stale(self) -> bool:
        """For a connection at rest (a pooled one): True when it has plaintext to read,
        or the peer closed it or broke it. Records that carry no plaintext (the TLS 1.3
        session tickets a client receives after its handshake, before it ever read) are
        taken in here, and the session offered, not mistaken for stray bytes. Not async,
        never blocks; only for a stream nobody is using."""
        if not self.is_readable():
            return False
        if self._closed or self._sock.pending() or self._receiving:
            return True
        try:
            self._sock.recv(1)  # plaintext or EOF: stale (the byte is lost with it)
        except ssl.SSLWantReadError:
            if self._on_session is not None:
                self._offer_session()
            return False
        except (ssl.SSLError, OSError):
            return True
        return True

    # -- handshake ---------------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake (once; later calls return at once). A cancel point.

        Raises:
            trio.BrokenResourceError: the handshake failed (its ``__cause__`` says why).
            trio.ClosedResourceError: the stream was closed.
        """
        self._check_open()
        if self._handshake_done:
            await trio.lowlevel.checkpoint()
            return
        if self._sending or self._receiving:
            raise trio.BusyResourceError("another task is using this stream")
        self._sending = self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                try:
                    self._sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    wait = self._wait_readable
                except ssl.SSLWantWriteError:
                    wait = self._wait_writable
                except (ssl.SSLError, OSError) as exc:
                    self._broken = True
                    raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
                await wait()  # outside the except: see receive_some
            self._handshake_done = True
        finally:
            self._sending = self._receiving = False
        await trio.lowlevel.checkpoint()

    # -- bytes -------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` of plaintext; ``b""`` after the peer's close_notify. A
        cancel point; a cancelled receive does not break the stream.

        Raises:
            trio.BrokenResourceError: TLS error, reset, or EOF without close_notify.
            trio.ClosedResourceError, trio.BusyResourceError.
        """
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE
        elif max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._check_open()
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            sock = self._sock
            waited = False
            while True:
                try:
                    data = sock.recv(max_bytes)
                    break
                except ssl.SSLWantReadError:
                    wait = self._wait_readable
                except ssl.SSLWantWriteError:
                    wait = self._wait_writable
                except (ssl.SSLError, OSError) as exc:
                    raise self._broke(exc) from exc
                # Wait outside the except block: inside it, the SSLWantReadError, its
                # traceback and the frames it holds would stay alive for as long as the
                # connection is idle (about 1 KiB per waiting stream).
                await wait()
                waited = True
            if len(data) >= _RECORD and len(data) < max_bytes:
                data = self._read_on(data, max_bytes)
            if self._on_session is not None and data:
                self._offer_session()
        finally:
            self._receiving = False
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    def _read_on(self, first: bytes, max_bytes: int) -> bytes:
        """More whole records already at hand, without waiting (bulk transfer)."""
        parts = [first]
        size = len(first)
        sock = self._sock
        while size < max_bytes:
            try:
                more = sock.recv(max_bytes - size)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except (ssl.SSLError, OSError):
                break  # the next receive raises it again, after these bytes
            if not more:
                break
            parts.append(more)
            size += len(more)
            if len(more) < _RECORD:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _offer_session(self) -> None:
        callback, self._on_session = self._on_session, None
        session = self._sock.session
        if callback is not None and session is not None and session.has_ticket:
            callback(session)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``; waits while the peer is slow. A cancel
        point; cancelled (or failed) part way, the stream is broken for sending.

        Raises:
            trio.BrokenResourceError: TLS error, reset, or an earlier interrupted send.
            trio.ClosedResourceError, trio.BusyResourceError.
        """
        self._check_open()
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        if self._broken:
            raise trio.BrokenResourceError("an earlier send was interrupted")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            if not data:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return
            view = memoryview(data)
            total = len(view)
            sent = 0
            sock = self._sock
            waited = False
            try:
                while sent < total:
                    try:
                        sent += sock.send(view[sent:])
                        continue
                    except ssl.SSLWantWriteError:
                        wait = self._wait_writable
                    except ssl.SSLWantReadError:
                        wait = self._wait_readable
                    waited = True
                    await wait()  # outside the except: see receive_some
            except (ssl.SSLError, OSError) as exc:
                raise self._broke(exc) from exc
            except BaseException:
                self._broken = True  # OpenSSL holds a write it must finish: unusable
                raise
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the socket takes bytes. A cancel point."""
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        await self._wait_writable()

    # -- closing -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Send close_notify (best effort, see the module docstring), close the fd.
        Idempotent. A cancel point; the fd is closed even when cancelled."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._handshake_done and not self._broken and not self._sending:
                await self._send_close_notify()
            elif self._handshake_done:
                tlssessions.keep_on_close(self._sock)
        finally:
            self._close_fd()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        """Close now (idempotent); not a cancel point: what ``aclose`` does when it is
        cancelled at once (``trio.aclose_forcefully``), a close_notify only if the
        socket takes it without waiting, without that call's cancel scope, trip through
        the scheduler and raised ``Cancelled``. See ``close_now``."""
        if self._closed:
            return
        try:
            if self._handshake_done and not self._broken and not self._sending:
                with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                    self._sock.unwrap()  # SSL_shutdown: a close_notify, if there is room
            elif self._handshake_done:
                tlssessions.keep_on_close(self._sock)
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        self._closed = True
        if self._reading.busy or self._writing.busy:  # else trio has no waiter to wake
            trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    async def _send_close_notify(self) -> None:
        self._sending = True
        try:
            while True:
                try:
                    self._sock.unwrap()  # SSL_shutdown: sends close_notify
                except ssl.SSLWantWriteError:
                    await self._wait_writable()
                    continue
                except (ssl.SSLWantReadError, ssl.SSLError, OSError, ValueError):
                    pass  # sent; we do not wait for the peer's
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self._sending = False

    # -- helpers -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream was closed")

    def _broke(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = True
        if isinstance(exc, ssl.SSLEOFError):
            return trio.BrokenResourceError("the peer closed without close_notify")
        return trio.BrokenResourceError(str(exc) or type(exc).__name__)

    async def _wait_readable(self) -> None:
        """Wait until the fd is readable, or, if another task of this stream already
        waits for that, until its wait ended. A cancel point."""
        await self._reading.wait(self._sock)

    async def _wait_writable(self) -> None:
        """The same for writability."""
        await self._writing.wait(self._sock)


class _OneWaiter:
    """One direction's readiness wait on a socket, shared by the stream's tasks: trio
    lets only one task wait for one direction of one descriptor, so a second task parks
    until the first one's wait ended, then retries its call. The parking lot is made
    only when a second task comes (rare): an idle connection holds none."""

    __slots__ = ("_busy", "_lot", "_wait")

    def __init__(self, wait: Callable[[ssl.SSLSocket], Awaitable[None]]) -> None:
        self._wait = wait
        self._busy = False
        self._lot: trio.lowlevel.ParkingLot | None = None

    @property
    def busy(self) -> bool:
        """A task of the stream waits in trio for this direction now."""
        return self._busy

    async def wait(self, sock: ssl.SSLSocket) -> None:
        if self._busy:
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            await self._lot.park()
            return
        self._busy = True
        try:
            await self._wait(sock)
        except trio.ClosedResourceError:
            raise trio.ClosedResourceError("the TLS stream was closed") from None
        finally:
            self._busy = False
            if self._lot is not None:
                self._lot.unpark_all()


async def close_now(resource: trio.abc.AsyncResource) -> None:
    """``trio.aclose_forcefully(resource)``, done as a plain call for the agent's own
    streams (``close``: not a cancel point then), which are most of what the data path
    closes: per connection, ``aclose_forcefully`` cost about eight times the close
    itself (a cancel scope, a trip through the scheduler, a raised ``Cancelled``).
    Anything else (a trio stream in a test, say) goes through ``aclose_forcefully``."""
    if isinstance(resource, (PlainSocketStream, SslSocketStream)):
        resource.close()
    else:
        await trio.aclose_forcefully(resource)
