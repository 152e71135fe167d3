"""A mesh certificate authority: create it, and issue service certificates from it.

The CA certificate carries the mesh's trust domain as a URI SAN (``spiffe://<mesh>``)
so that a CA can only issue identities for its own mesh. Keys are EC P-256, PEM
encoded as unencrypted PKCS#8 (protect them with file permissions, see ``files``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshagent.pki.identity import NAME_RULE, is_valid_name, spiffe_id

DEFAULT_CA_VALIDITY = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates are valid from this long before ``now``, for hosts whose clocks lag."""

_SIGNING_KEYS = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)
_TLS_PUBLIC_KEYS = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


@dataclass(frozen=True, slots=True)
class PemPair:
    """A certificate and its private key, both PEM encoded."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)


def create_ca(mesh: str, *, now: datetime, valid_for: timedelta = DEFAULT_CA_VALIDITY) -> PemPair:
    """Create a self-signed CA for ``mesh`` with a fresh EC P-256 key.

    Args:
        mesh: the mesh name; becomes the trust domain ``spiffe://<mesh>``.
        now: the current time (timezone-aware).
        valid_for: how long the CA is valid; issued certificates never outlive it.

    Returns:
        The CA certificate and its private key.

    Raises:
        ValueError: invalid mesh name, naive ``now`` or non-positive ``valid_for``.
    """
    if not is_valid_name(mesh):
        raise ValueError(f'invalid mesh name "{mesh}": use {NAME_RULE}')
    if valid_for <= timedelta(0):
        raise ValueError("the CA validity must be more than 0")
    now = _utc(now)
    try:
        not_after = now + valid_for
    except OverflowError:
        raise ValueError("the CA validity is too long") from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshagent {mesh} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{mesh}")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return PemPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue_leaf(ca: PemPair, mesh: str, service: str, *, now: datetime, ttl: timedelta) -> PemPair:
    """Issue a certificate for ``service``, with a fresh EC P-256 key made here.

    Same arguments and errors as ``issue_leaf_for_public_key``.

    Returns:
        The service certificate and its private key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cert_pem = issue_leaf_for_public_key(ca, mesh, service, key.public_key(), now=now, ttl=ttl)
    return PemPair(cert_pem, _key_pem(key))


def issue_leaf_for_public_key(
    ca: PemPair,
    mesh: str,
    service: str,
    public_key: CertificatePublicKeyTypes,
    *,
    now: datetime,
    ttl: timedelta,
) -> bytes:
    """Issue a certificate for ``service`` over a key that was made elsewhere.

    The certificate is a TLS client and server certificate whose only SAN is the
    SPIFFE ID ``spiffe://<mesh>/service/<service>``. It is valid from ``now`` minus
    ``CLOCK_SKEW`` until ``now + ttl``, clipped to the CA's own expiry.

    Args:
        ca: the CA certificate and key.
        mesh: the mesh; must be the CA's trust domain.
        service: the service name.
        public_key: the key to certify (EC, RSA, Ed25519 or Ed448).
        now: the current time (timezone-aware).
        ttl: the requested lifetime.

    Returns:
        The certificate, PEM encoded.

    Raises:
        ValueError: invalid names, a CA for another mesh, an expired or unusable CA,
            a key type TLS cannot use, naive ``now`` or a non-positive ``ttl``.
    """
    identity = spiffe_id(mesh, service)
    if ttl <= timedelta(0):
        raise ValueError("the certificate lifetime must be more than 0")
    if not isinstance(public_key, _TLS_PUBLIC_KEYS):
        raise ValueError(f"cannot certify a {type(public_key).__name__} for TLS")
    now = _utc(now)
    ca_cert, ca_key = _load_ca(ca)
    domain = _trust_domain(ca_cert)
    if domain != mesh:
        raise ValueError(
            f'refusing to issue for mesh "{mesh}": this CA is for mesh "{domain}" '
            f"(trust domain spiffe://{domain})"
        )
    ca_not_after = ca_cert.not_valid_after_utc
    if now >= ca_not_after:
        raise ValueError(f"the CA expired on {ca_not_after:%Y-%m-%d %H:%M} UTC; create a new CA")
    try:
        not_after = min(now + ttl, ca_not_after)
    except OverflowError:
        not_after = ca_not_after
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            _key_usage(
                digital_signature=True,
                key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=False,
        )
        .sign(ca_key, _hash_for(ca_key))
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def ca_trust_domain(cert_pem: bytes) -> str:
    """Return the mesh a CA certificate is for (its ``spiffe://<mesh>`` URI SAN).

    Raises:
        ValueError: not a PEM certificate, or it has no trust-domain SAN.
    """
    return _trust_domain(_load_cert(cert_pem))


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Return the URI subjectAltName values of ``cert``, in certificate order."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _trust_domain(cert: x509.Certificate) -> str:
    for uri in uri_sans(cert):
        domain = uri.removeprefix("spiffe://")
        if domain != uri and is_valid_name(domain):
            return domain
    raise ValueError(
        "the CA certificate has no spiffe://<mesh> URI SAN naming its trust domain "
        "(make the CA with: meshagent pki init-ca)"
    )


def _load_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError("the CA certificate is not a PEM certificate") from None


def _load_ca(ca: PemPair) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    cert = _load_cert(ca.cert_pem)
    try:
        key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the CA key is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, _SIGNING_KEYS):
        raise ValueError(f"the CA key is a {type(key).__name__}, which cannot sign certificates")
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise ValueError("the CA key does not belong to the CA certificate")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ValueError("the CA certificate is not a CA certificate (BasicConstraints ca=False)")
    return cert, key


def public_der(public_key: PublicKeyTypes) -> bytes:
    """Return ``public_key`` as DER SubjectPublicKeyInfo, for comparing keys."""
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return hashes.SHA256()


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _utc(now: datetime) -> datetime:
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(UTC)")
    return now.astimezone(UTC).replace(microsecond=0)
