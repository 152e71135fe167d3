"""The framing two agents speak inside their mTLS connection (ALPN ``meshagent/2``, or
``meshagent/1`` with an older agent).

Theory of operation. TCP lets one side say "I am done sending" (a FIN) while it keeps
reading: legacy protocols rely on it (a client sends a request, shuts down its write
side, reads the answer). TLS cannot carry that: a close_notify ends the session for
Python's ``ssl``. So between agents every byte of the proxied stream travels in a DATA
frame, and a half-close travels as an END frame; the TLS session itself closes only
when both directions are done.

Frame layout (4-byte header, network byte order)::

    +--------+-------------------------+------------------+
    | type 1 | length 3 (big-endian)   | payload (length) |
    +--------+-------------------------+------------------+

* ``DATA`` (0x01): 1..max_payload bytes of the stream. A sender writes a frame whole,
  waiting on nothing but its socket: a receiver may wait for most of a big frame's
  bytes before it reads (the C pump sets ``SO_RCVLOWAT`` to a frame's remaining bytes,
  less 32 KiB, for at most a millisecond), so a frame left half-written costs latency.
* ``END`` (0x02): length 0; the sender will send nothing more in this direction.
* ``OPEN`` (0x03, ``meshagent/2`` only): length 0; the caller starts a stream. The
  connection carries one stream at a time: the first after the handshake, the next
  once both directions of the last one ended with END, so a caller can keep the
  connection for its next client connection instead of a new handshake.
* ``OPENED`` (0x04, ``meshagent/2`` only): length 0; the called agent connected its app
  and the stream's DATA may flow. A caller that gets end of stream instead knows no
  byte of its client was sent: it may try another connection.

Invariants (checked by the decoder, each a ``FrameError``):
* an unknown type, an empty DATA frame, an END frame with a payload, a payload over
  ``max_payload`` and any byte after END are protocol errors: the connection is closed;
* the decoder never buffers more than one header plus one payload, so a peer cannot make
  us hold more than ``max_payload + 4`` bytes per direction.
"""

from __future__ import annotations

from typing import Final

ALPN: Final = "meshagent/1"
ALPN_STREAMS: Final = "meshagent/2"
DATA: Final = 0x01
END: Final = 0x02
OPEN: Final = 0x03
OPENED: Final = 0x04
HEADER_BYTES: Final = 4
DEFAULT_MAX_PAYLOAD: Final = 256 * 1024
END_FRAME: Final = bytes((END, 0, 0, 0))
OPEN_FRAME: Final = bytes((OPEN, 0, 0, 0))
OPENED_FRAME: Final = bytes((OPENED, 0, 0, 0))

_CONTROL_NAMES: Final = {OPEN: "OPEN", OPENED: "OPENED"}


class FrameError(Exception):
    """The peer broke the framing; the connection must be closed."""


def encode_data(payload: bytes | bytearray | memoryview) -> bytes:
    """One DATA frame carrying ``payload`` (1..2**24-1 bytes). Pure."""
    size = len(payload)
    if not 0 < size < 1 << 24:
        raise ValueError(f"DATA payload must be 1..16777215 bytes, got {size}")
    return bytes((DATA, size >> 16, (size >> 8) & 0xFF, size & 0xFF)) + payload


def check_control(header: bytes, kind: int) -> None:
    """Raise ``FrameError`` unless ``header`` is the 4-byte frame ``kind`` (OPEN or
    OPENED) with no payload. Pure."""
    if header == bytes((kind, 0, 0, 0)):
        return
    want = _CONTROL_NAMES[kind]
    if len(header) != HEADER_BYTES:
        raise FrameError(f"expected an {want} frame, got {len(header)} bytes")
    if header[0] != kind:
        raise FrameError(f"expected an {want} frame, got type 0x{header[0]:02x}")
    raise FrameError(f"{want} frame with a payload")


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)`` returns the stream bytes it completed.

    ``ended`` turns true once END arrived; after that any further byte is an error.
    """

    __slots__ = ("_buffer", "_max_payload", "ended")

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._max_payload = max_payload
        self.ended = False

    def feed(self, data: bytes | bytearray) -> list[bytes]:
        """Consume ``data``; return the payloads of every DATA frame it completed.

        Raises:
            FrameError: the bytes are not valid framing (see the module invariants).
        """
        if not data:
            return []
        if self.ended:
            raise FrameError("data after END frame")
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        view = memoryview(buffer)
        offset = 0
        total = len(buffer)
        try:
            while total - offset >= HEADER_BYTES:
                kind = view[offset]
                size = (view[offset + 1] << 16) | (view[offset + 2] << 8) | view[offset + 3]
                if kind == DATA:
                    if size == 0:
                        raise FrameError("empty DATA frame")
                    if size > self._max_payload:
                        raise FrameError(
                            f"DATA frame of {size} bytes exceeds the limit of {self._max_payload}"
                        )
                    end = offset + HEADER_BYTES + size
                    if end > total:
                        break
                    out.append(bytes(view[offset + HEADER_BYTES : end]))
                    offset = end
                elif kind == END:
                    if size != 0:
                        raise FrameError("END frame with a payload")
                    offset += HEADER_BYTES
                    if offset != total:
                        raise FrameError("data after END frame")
                    self.ended = True
                else:
                    raise FrameError(
                        f"unknown frame type 0x{kind:02x} (peer is not a meshagent/1 agent)"
                    )
        finally:
            view.release()
        del buffer[:offset]
        return out

    def buffered(self) -> int:
        """Bytes held waiting for the rest of a frame (at most max_payload + 3)."""
        return len(self._buffer)
