"""Secrets at rest and bearer tokens. Pure.

* A builtin mesh CA's private key is stored encrypted with AES-256-GCM under a key the
  operator owns (a file of at least 32 random bytes; ``new_key_file_bytes()`` makes
  one). The mesh name is bound in as associated data, so a blob cannot be moved to
  another mesh.
* Tokens are ``ma1_<id>_<secret>``: the id (public) finds the record, the store keeps
  only SHA-256 of the whole token, and comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_VERSION = b"ma-enc-1:"
KEY_BYTES = 32


class SecretError(ValueError):
    """A key file or a sealed blob is unusable (one line)."""


def new_key_file_bytes() -> bytes:
    return os.urandom(KEY_BYTES)


def key_from_file_bytes(data: bytes) -> bytes:
    """The AES key from a key file's content: SHA-256 of all of it (at least 32 bytes).

    Raises:
        SecretError: the file is too short to be a key.
    """
    if len(data) < KEY_BYTES:
        raise SecretError(
            f"key file holds {len(data)} bytes; it needs at least {KEY_BYTES} random bytes "
            "(make one with: head -c 32 /dev/urandom > FILE; chmod 600 FILE)"
        )
    return hashlib.sha256(data).digest()


def seal(key: bytes, plaintext: bytes, *, context: str) -> bytes:
    """Encrypt ``plaintext``, bound to ``context`` (e.g. the mesh name)."""
    nonce = os.urandom(12)
    return _VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, context.encode())


def unseal(key: bytes, blob: bytes, *, context: str) -> bytes:
    """Decrypt a ``seal`` blob.

    Raises:
        SecretError: wrong key, wrong context, or a damaged blob.
    """
    if not blob.startswith(_VERSION) or len(blob) < len(_VERSION) + 12 + 16:
        raise SecretError("not a sealed secret of this version")
    body = blob[len(_VERSION) :]
    try:
        return AESGCM(key).decrypt(body[:12], body[12:], context.encode())
    except InvalidTag:
        raise SecretError(
            f"cannot decrypt the secret of {context!r}: wrong key file, or the data was altered"
        ) from None


def new_token() -> tuple[str, str, str]:
    """A fresh token. Returns (token, token_id, digest); store only id and digest."""
    token_id = secrets.token_hex(6)
    token = f"ma1_{token_id}_{secrets.token_urlsafe(32)}"
    return token, token_id, token_digest(token)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_id_of(token: str) -> str:
    """The public id part of a token.

    Raises:
        SecretError: not a meshagent token.
    """
    parts = token.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != "ma1" or not parts[1] or not parts[2]:
        raise SecretError("not a meshagent token (expected ma1_<id>_<secret>)")
    return parts[1]


def token_matches(token: str, digest: str) -> bool:
    return hmac.compare_digest(token_digest(token.strip()), digest)
