from __future__ import annotations

import pytest

from meshagent.protocol.detect import Detected, detect


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [(b"", Detected.NEED_MORE), (b"\x16", Detected.NEED_MORE), (b"\x16\x03\x01", Detected.TLS),
     (b"\x16\x03", Detected.TLS), (b"GET / HTTP/1.1", Detected.PLAINTEXT), (b"\x16\x01", Detected.PLAINTEXT),
     (b"\x00", Detected.PLAINTEXT), (b"EHLO", Detected.PLAINTEXT)],
)
def test_detect(prefix: bytes, kind: Detected) -> None:
    assert detect(prefix) is kind
