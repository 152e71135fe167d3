"""CA rotation: which CA issued a certificate, and when an agent renews because of it. Pure.

Theory of operation:

* A CA is named by its *fingerprint*: the hex SHA-256 of its DER certificate. Two
  builtin CAs of one mesh have the same subject name, so names cannot tell them apart;
  fingerprints can, and are public.
* ``issuer_fingerprint`` finds, among the CAs of a trust bundle, the one whose
  signature verifies on a certificate (not the one whose name matches), and returns
  "" when none does (its CA was dropped from the bundle).
* During a rotation the central agent names the CA that signs now (``signing_ca`` in
  the config). A certificate from any other CA is renewed at once, after a random
  delay (``rotation_delay``) drawn once per change of signing CA, so the agents of a
  large mesh spread their renewals over ``spread_seconds`` instead of all asking the
  central agent in the same second.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


def fingerprint(cert: x509.Certificate) -> str:
    """The hex SHA-256 of ``cert``'s DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def ca_fingerprint(cert_pem: str | bytes) -> str:
    """The fingerprint of the first certificate in ``cert_pem``.

    Raises:
        ValueError: not a PEM certificate.
    """
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    return fingerprint(x509.load_pem_x509_certificate(data))


def bundle_fingerprints(bundle_pem: str | bytes) -> list[str]:
    """The fingerprints of every certificate of a trust bundle, in order ("" → [])."""
    data = bundle_pem.encode() if isinstance(bundle_pem, str) else bundle_pem
    if not data.strip():
        return []
    return [fingerprint(cert) for cert in x509.load_pem_x509_certificates(data)]


def issuer_fingerprint(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> str:
    """The fingerprint of the CA in ``cas`` that signed ``cert``; "" if none did."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return fingerprint(ca)
    return ""


def needs_rotation(issuers: Iterable[str], signing_ca: str) -> bool:
    """Were some of an agent's certificates (by ``issuers``, their CAs' fingerprints)
    issued by a CA that is not the mesh's signing CA? False when ``signing_ca`` is
    unknown ("": a central agent without rotation)."""
    return bool(signing_ca) and any(issuer != signing_ca for issuer in issuers)


def rotation_delay(spread_seconds: float, rng: random.Random) -> float:
    """How long to wait before a renewal caused by a rotation: uniform in
    [0, ``spread_seconds``] (a spread that is not a positive number: at once)."""
    if not spread_seconds > 0:
        return 0.0
    return rng.uniform(0.0, spread_seconds)


def short(fingerprint_hex: str) -> str:
    """The first 12 hex digits of a fingerprint, for people ("" stays "")."""
    return fingerprint_hex[:12]


__all__ = [
    "bundle_fingerprints",
    "ca_fingerprint",
    "fingerprint",
    "issuer_fingerprint",
    "needs_rotation",
    "rotation_delay",
    "short",
]
