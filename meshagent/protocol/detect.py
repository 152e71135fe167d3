"""What a connection speaks, from its first bytes. Pure.

A TLS connection opens with a handshake record: content type 0x16, then the protocol
version's major byte 0x03. Nothing else a legacy client sends starts that way (0x16
is a control character in text protocols).
"""

from __future__ import annotations

from enum import Enum


class Detected(Enum):
    TLS = "tls"
    PLAINTEXT = "plaintext"
    NEED_MORE = "need-more"


def detect(prefix: bytes) -> Detected:
    """Classify the first bytes of a connection."""
    if not prefix:
        return Detected.NEED_MORE
    if prefix[0] != 0x16:
        return Detected.PLAINTEXT
    if len(prefix) < 2:
        return Detected.NEED_MORE
    return Detected.TLS if prefix[1] == 0x03 else Detected.PLAINTEXT
