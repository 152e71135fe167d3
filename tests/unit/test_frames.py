"""The agent-to-agent framing: exhaustive cases and arbitrary splits."""

from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent.protocol.frames import (
    END_FRAME,
    OPEN_FRAME,
    OPENED_FRAME,
    FrameDecoder,
    FrameError,
    check_control,
    encode_data,
)


def decode_all(chunks: list[bytes], max_payload: int = 1024) -> tuple[bytes, bool]:
    decoder = FrameDecoder(max_payload)
    out = b"".join(b"".join(decoder.feed(c)) for c in chunks)
    return out, decoder.ended


def test_data_then_end() -> None:
    wire = encode_data(b"hello") + encode_data(b" world") + END_FRAME
    assert decode_all([wire]) == (b"hello world", True)


def test_header_layout_is_type_then_24_bit_length() -> None:
    assert encode_data(b"a" * 258)[:4] == bytes((1, 0, 1, 2))
    assert bytes((2, 0, 0, 0)) == END_FRAME


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (bytes((0, 0, 0, 1, 0)), "unknown frame type 0x00"),
        (b"GET / HTTP/1.1\r\n", "unknown frame type 0x47"),
        (bytes((1, 0, 0, 0)), "empty DATA"),
        (bytes((2, 0, 0, 1, 0)), "END frame with a payload"),
        (bytes((1, 0, 4, 1)), "exceeds the limit of 1024"),
        (END_FRAME + encode_data(b"late"), "data after END"),
    ],
)
def test_protocol_errors(wire: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_all([wire])


def test_feed_after_end_is_an_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(END_FRAME)
    with pytest.raises(FrameError, match="after END"):
        decoder.feed(b"x")
    assert decoder.feed(b"") == []


def test_encode_rejects_empty_and_oversized() -> None:
    with pytest.raises(ValueError):
        encode_data(b"")
    with pytest.raises(ValueError):
        encode_data(memoryview(bytes(1 << 24)))


def test_buffer_never_exceeds_one_frame() -> None:
    decoder = FrameDecoder(max_payload=1024)
    wire = encode_data(b"x" * 1024) * 10
    for i in range(0, len(wire), 7):
        decoder.feed(wire[i : i + 7])
        assert decoder.buffered() <= 1024 + 3


@given(
    payloads=st.lists(st.binary(min_size=1, max_size=300), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=30),
    end=st.booleans(),
)
def test_any_split_of_the_wire_decodes_the_same(
    payloads: list[bytes], cuts: list[int], end: bool
) -> None:
    wire = b"".join(encode_data(p) for p in payloads) + (END_FRAME if end else b"")
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    assert decode_all(chunks) == (b"".join(payloads), end)


@given(st.binary(max_size=64))
def test_garbage_either_decodes_or_raises_frame_error(data: bytes) -> None:
    decoder = FrameDecoder(max_payload=1024)
    with contextlib.suppress(FrameError):
        decoder.feed(data)


@pytest.mark.parametrize(
    ("header", "kind", "error"),
    [
        (bytes((3, 0, 0, 0)), 3, None),
        (bytes((4, 0, 0, 0)), 4, None),
        (bytes((4, 0, 0, 0)), 3, "expected an OPEN frame, got type 0x04"),
        (bytes((1, 0, 0, 5)), 4, "expected an OPENED frame, got type 0x01"),
        (b"GET ", 3, "expected an OPEN frame, got type 0x47"),
        (bytes((3, 0, 0, 1)), 3, "OPEN frame with a payload"),
        (bytes((4, 1, 0, 0)), 4, "OPENED frame with a payload"),
        (bytes((3, 0)), 3, "expected an OPEN frame, got 2 bytes"),
    ],
)
def test_stream_control_frames_are_checked(header: bytes, kind: int, error: str | None) -> None:
    if error is None:
        check_control(header, kind)
        assert header in (OPEN_FRAME, OPENED_FRAME)
    else:
        with pytest.raises(FrameError, match=error):
            check_control(header, kind)


def test_the_decoder_of_a_stream_refuses_control_frames() -> None:
    """OPEN/OPENED belong between streams: inside one they are unknown frames."""
    with pytest.raises(FrameError, match="unknown frame type 0x03"):
        decode_all([encode_data(b"x") + OPEN_FRAME])
