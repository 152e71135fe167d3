"""Encode and decode snapshots as JSON (the on-disk cache, later the wire format)."""

from __future__ import annotations

import msgspec

from meshagent.snapshot.model import SCHEMA_VERSION, Snapshot

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Snapshot)


class SnapshotDecodeError(ValueError):
    """The bytes are not a snapshot this agent understands."""


def encode(snapshot: Snapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode(data: bytes) -> Snapshot:
    """Decode a snapshot; raises SnapshotDecodeError with the offending path."""
    try:
        snapshot = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SnapshotDecodeError(f"not a valid snapshot: {exc}") from None
    if snapshot.schema_version > SCHEMA_VERSION:
        raise SnapshotDecodeError(
            f"snapshot schema {snapshot.schema_version} is newer than this agent's "
            f"({SCHEMA_VERSION}): upgrade meshagent"
        )
    return snapshot


def is_newer(candidate: Snapshot, current: Snapshot | None) -> bool:
    return current is None or candidate.version > current.version
