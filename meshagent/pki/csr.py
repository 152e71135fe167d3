"""Certificate signing requests: made on the host (the key never leaves it), signed by
the central agent only for the mesh and services a token allows. Pure."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshagent.pki.ca import CLOCK_SKEW, PemPair, issue_leaf_for_public_key, public_der, uri_sans
from meshagent.pki.identity import parse_spiffe_id, spiffe_id


class CsrRejected(ValueError):
    """The request is malformed or asks for something it may not have (one line)."""


def make_csr(mesh: str, service: str) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a CSR for ``spiffe://<mesh>/service/<service>``.

    Returns:
        (csr_pem, key_pem); the key is unencrypted PEM for the caller to store 0600.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    identity = spiffe_id(mesh, service)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return csr.public_bytes(serialization.Encoding.PEM), key_pem


def requested_identity(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, str, str]:
    """Parse a CSR and return it with the (mesh, service) of its single SPIFFE ID.

    Raises:
        CsrRejected: not a PEM CSR, a bad signature, or not exactly one spiffe URI SAN.
    """
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise CsrRejected("not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CsrRejected("the request's signature does not verify")
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CsrRejected("the request names no SPIFFE ID (no subjectAltName)") from None
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(list(sans)) != 1:
        raise CsrRejected("the request must name exactly one SPIFFE ID and nothing else")
    try:
        identity = parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise CsrRejected(str(exc)) from None
    return csr, identity.mesh, identity.service


def sign_csr(
    ca: PemPair,
    csr_pem: bytes,
    *,
    mesh: str,
    allowed_services: Collection[str],
    now: datetime,
    ttl: timedelta,
) -> tuple[str, bytes]:
    """Sign a CSR if it asks for ``mesh`` and one of ``allowed_services``.

    Returns:
        (service, certificate PEM).
    Raises:
        CsrRejected: malformed, another mesh, or a service outside ``allowed_services``.
    """
    csr, asked_mesh, service = requested_identity(csr_pem)
    if asked_mesh != mesh:
        raise CsrRejected(f"asks for mesh {asked_mesh!r}; this credential is for mesh {mesh!r}")
    if service not in allowed_services:
        allowed = ", ".join(sorted(allowed_services)) or "none"
        raise CsrRejected(f"asks for service {service!r}; allowed: {allowed}")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CsrRejected("only EC keys are accepted (generate an EC P-256 key)")
    cert = issue_leaf_for_public_key(ca, mesh, service, public_key, now=now, ttl=ttl)
    return service, cert


def renew_at(not_before: datetime, not_after: datetime) -> datetime:
    """When to renew: at two thirds of the certificate's life since it was issued.

    Certificates are valid from ``CLOCK_SKEW`` before they were issued (for hosts whose
    clocks lag); that margin is not life to count, or a certificate shorter-lived than
    three times the margin would be due for renewal the moment it arrives."""
    issued = min(not_before + CLOCK_SKEW, not_after)
    return issued + (not_after - issued) * 2 / 3


def check_issued(
    cert_pem: bytes, key_pem: bytes, ca_pem: bytes, *, mesh: str, service: str
) -> tuple[datetime, datetime]:
    """Check a certificate the central agent issued before using it: it parses, holds
    the public half of ``key_pem``, names exactly ``spiffe://<mesh>/service/<service>``
    and was signed by one of the CAs in ``ca_pem``.

    Returns:
        (not_before, not_after), UTC.
    Raises:
        CsrRejected: with one line saying what does not match.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CsrRejected(f"{service}: the issued certificate is not PEM") from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    if public_der(cert.public_key()) != public_der(key.public_key()):
        raise CsrRejected(f"{service}: the issued certificate is for another key")
    wanted = spiffe_id(mesh, service)
    if uri_sans(cert) != [wanted]:
        raise CsrRejected(f"{service}: the issued certificate names {uri_sans(cert)}, not {wanted}")
    try:
        cas = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise CsrRejected("the trust bundle is not PEM certificates") from None
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    raise CsrRejected(f"{service}: the issued certificate is not signed by the mesh's CA")
