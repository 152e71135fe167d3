"""The central agent's own TLS: a small CA and a server certificate for its API.

Theory of operation:

* This is not a mesh CA. It has no SPIFFE trust domain; it only lets the CLI and agents
  verify that they talk to this central agent (``central-ca.pem`` is what operators
  copy to their machines, ``--central-ca``).
* First start: create ``central-ca.pem`` / ``central-ca-key.pem`` (0600) and
  ``central-server.pem`` / ``central-server-key.pem`` (0600) in the data directory.
  The server certificate names the listen host (IP or DNS SAN), the ``server_names``
  of central.toml (the DNS names and addresses clients use in front of it: a DNS name
  or VIP for several replicas), ``127.0.0.1``, ``::1`` and ``localhost``.
* Later starts reuse them. The server certificate (not the CA) is issued again from the
  same CA when its names are not exactly those (a name added or removed) or it ends
  within ``RENEW_BEFORE``, so clients that trust ``central-ca.pem`` keep working.

Pure and synchronous (files and ``cryptography`` only); the caller runs it in a thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshagent.pki.files import write_private_file, write_public_file

CA_CERT_FILE = "central-ca.pem"
CA_KEY_FILE = "central-ca-key.pem"
SERVER_CERT_FILE = "central-server.pem"
SERVER_KEY_FILE = "central-server-key.pem"

CA_VALIDITY = timedelta(days=3650)
SERVER_VALIDITY = timedelta(days=397)
RENEW_BEFORE = timedelta(days=30)
_SKEW = timedelta(minutes=5)
_ALWAYS = ("127.0.0.1", "::1", "localhost")


class CentralTlsError(Exception):
    """The central agent's TLS files are unusable; ``str()`` is one line naming the file."""


@dataclass(frozen=True, slots=True)
class CentralTls:
    """Paths of the files the API server and its clients use."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    created_ca: bool


def ensure_central_tls(
    data_dir: Path, listen_host: str, *, now: datetime, server_names: Sequence[str] = ()
) -> CentralTls:
    """Create (first start) or reuse the central CA and server certificate in ``data_dir``.

    Args:
        data_dir: the central agent's data directory (must exist).
        listen_host: the host part of ``listen`` (an IP address or a DNS name).
        now: the current time (timezone-aware).
        server_names: more names for the certificate: DNS names and IP addresses
            (central.toml ``server_names``, checked by ``validate_central``).

    Returns:
        The paths, and whether the CA was made now.

    Raises:
        CentralTlsError: an existing CA file cannot be read or does not match its key.
    """
    ca_cert_path = data_dir / CA_CERT_FILE
    ca_key_path = data_dir / CA_KEY_FILE
    cert_path = data_dir / SERVER_CERT_FILE
    key_path = data_dir / SERVER_KEY_FILE
    created = False
    if ca_cert_path.exists() or ca_key_path.exists():
        ca_cert, ca_key = _load_ca(ca_cert_path, ca_key_path)
    else:
        ca_cert, ca_key = _create_ca(now)
        write_private_file(ca_key_path, _key_pem(ca_key))
        write_public_file(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM))
        created = True
    names = _names_for(listen_host, server_names)
    if created or not _server_cert_is_fine(cert_path, key_path, ca_cert, names, now):
        cert_pem, key_pem = _issue_server(ca_cert, ca_key, names, now)
        write_private_file(key_path, key_pem)
        write_private_file(cert_path, cert_pem)
    return CentralTls(ca_cert_path, cert_path, key_path, created)


def _names_for(host: str, extra: Sequence[str] = ()) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for value in (host, *extra, *_ALWAYS):
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            name = x509.DNSName(value)
        if name not in names:
            names.append(name)
    return names


def _create_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshagent central CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_server(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: list[x509.GeneralName],
    now: datetime,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    not_after = min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshagent central")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _load_ca(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CentralTlsError(f"{cert_path}: not a readable PEM certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise CentralTlsError(f"{key_path}: not a readable PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CentralTlsError(
            f"{key_path} does not belong to {cert_path}; move both away to make a new "
            "central CA (clients then need the new central-ca.pem)"
        )
    return cert, key


def _server_cert_is_fine(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    names: list[x509.GeneralName],
    now: datetime,
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if key.public_key() != cert.public_key() or cert.issuer != ca_cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if set(san) != set(names):
        return False
    return cert.not_valid_after_utc - RENEW_BEFORE > now.astimezone(UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
