"""Certificate and key files: atomic writes with safe modes, loading, and checks.

Every problem is a ``PkiError`` whose message is one line naming the file and saying
what to do about it, fit to show a user as is.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from meshagent.pki.ca import PemPair, public_der, uri_sans
from meshagent.pki.identity import parse_spiffe_id

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"

_TLS_HINT = "check the [tls] paths"
_INIT_CA_HINT = "create a CA with: meshagent pki init-ca --mesh NAME --out DIR"


class PkiError(Exception):
    """A certificate or key file problem; ``str()`` is one line a user can act on."""


@dataclass(frozen=True, slots=True)
class CheckedIdentity:
    """What ``check_identity_files`` found: whom the certificate names, and until when."""

    spiffe_id: str
    not_after: datetime


def write_private_file(path: Path, data: bytes) -> None:
    """Atomically write ``path`` with mode 0600 (for private keys).

    Raises:
        PkiError: the file or a temporary file next to it cannot be written.
    """
    _write_atomic(path, data, 0o600)


def write_public_file(path: Path, data: bytes) -> None:
    """Atomically write ``path`` with mode 0644 (for certificates).

    Raises:
        PkiError: the file or a temporary file next to it cannot be written.
    """
    _write_atomic(path, data, 0o644)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    # Readers see the old file or the new one, never a torn one; a key is never
    # readable by others, not even for a moment, as the mode is set at creation.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, mode)
        try:
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), mode)  # exact mode, whatever the umask
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise PkiError(f"{path}: cannot write: {exc.strerror or exc}") from None
    with contextlib.suppress(OSError):  # make the rename durable; best effort
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path: Path, missing_hint: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{path}: no such file — {missing_hint}") from None
    except PermissionError:
        raise PkiError(
            f"{path}: permission denied — make it readable by the user running meshagent"
        ) from None
    except IsADirectoryError:
        raise PkiError(f"{path}: is a directory, not a PEM file — {missing_hint}") from None
    except OSError as exc:
        raise PkiError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _parse_certificate(path: Path, data: bytes) -> x509.Certificate:
    if b"-----BEGIN CERTIFICATE-----" not in data and b"PRIVATE KEY-----" in data:
        raise PkiError(f"{path}: holds a private key, not a certificate — swapped cert and key?")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(
            f"{path}: not a PEM certificate — expected '-----BEGIN CERTIFICATE-----'"
        ) from None


def _parse_private_key(path: Path, data: bytes) -> PrivateKeyTypes:
    if b"PRIVATE KEY-----" not in data and b"-----BEGIN CERTIFICATE-----" in data:
        raise PkiError(f"{path}: holds a certificate, not a private key — swapped cert and key?")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(
            f"{path}: the key is encrypted — meshagent needs an unencrypted key (mode 0600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PkiError(
            f"{path}: not a PEM private key — expected '-----BEGIN PRIVATE KEY-----'"
        ) from None


def load_certificate(path: Path) -> x509.Certificate:
    """Load the first certificate of a PEM file.

    Raises:
        PkiError: missing, unreadable or not a PEM certificate.
    """
    return _parse_certificate(path, _read(path, _TLS_HINT))


def load_private_key(path: Path) -> PrivateKeyTypes:
    """Load an unencrypted PEM private key.

    Raises:
        PkiError: missing, unreadable, encrypted or not a PEM private key.
    """
    return _parse_private_key(path, _read(path, _TLS_HINT))


def load_ca(directory: Path) -> PemPair:
    """Load a CA written by ``meshagent pki init-ca``: ``ca.pem`` and ``ca-key.pem``.

    Raises:
        PkiError: either file is missing, unreadable or not PEM, or they do not match.
    """
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    cert_pem, key_pem = _read(cert_path, _INIT_CA_HINT), _read(key_path, _INIT_CA_HINT)
    cert = _parse_certificate(cert_path, cert_pem)
    key = _parse_private_key(key_path, key_pem)
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise PkiError(f"{key_path}: not the key of {cert_path} — restore the matching pair")
    return PemPair(cert_pem, key_pem)


def check_identity_files(
    ca_path: Path,
    cert_path: Path,
    key_path: Path,
    *,
    mesh: str,
    service: str | None,
    now: datetime,
) -> CheckedIdentity:
    """Check that a certificate, its key and the CA fit together and name the right service.

    Args:
        ca_path: the mesh CA certificate (PEM).
        cert_path: the service certificate (PEM).
        key_path: the service private key (PEM, unencrypted).
        mesh: the mesh this agent belongs to.
        service: the service the certificate must name, or None to accept any.
        now: the current time (timezone-aware).

    Returns:
        The certificate's SPIFFE ID and expiry.

    Raises:
        PkiError: a file is missing, unreadable or not PEM; the key does not match the
            certificate; the CA did not sign it; it or the CA is expired or not yet
            valid; or it does not name exactly one SPIFFE ID for ``mesh``/``service``.
        ValueError: ``now`` is naive.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware, e.g. datetime.now(UTC)")
    ca_cert = load_certificate(ca_path)
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    reissue = f"meshagent pki issue --mesh {mesh} --service {service or 'NAME'}"

    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise PkiError(
            f"{key_path}: not the key of {cert_path} — use the key issued with that certificate"
        )
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"{cert_path}: not signed by the CA in {ca_path} — issue one from that CA with: "
            f"{reissue}"
        ) from None

    _check_dates(ca_path, ca_cert, now, what="CA certificate", renew="create a new CA")
    _check_dates(cert_path, cert, now, what="certificate", renew=f"issue one with: {reissue}")

    uris = [uri for uri in uri_sans(cert) if uri.startswith("spiffe://")]
    if len(uris) != 1:
        found = str(len(uris)) if uris else "no"
        raise PkiError(
            f"{cert_path}: certificate has {found} spiffe:// URI SANs, expected one — "
            f"issue one with: {reissue}"
        )
    try:
        identity = parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise PkiError(f"{cert_path}: {exc} — issue one with: {reissue}") from None
    if identity.mesh != mesh:
        raise PkiError(
            f'{cert_path}: certificate is for {identity.uri}, but this agent is in mesh "{mesh}"'
            f" — issue one with: meshagent pki issue --mesh {mesh} --service {identity.service}"
        )
    if service is not None and identity.service != service:
        raise PkiError(
            f'{cert_path}: certificate is for {identity.uri}, but this inbound serves "{service}"'
            f" — issue one with: meshagent pki issue --service {service}"
        )
    return CheckedIdentity(identity.uri, cert.not_valid_after_utc)


def _check_dates(
    path: Path, cert: x509.Certificate, now: datetime, *, what: str, renew: str
) -> None:
    if now < cert.not_valid_before_utc:
        raise PkiError(
            f"{path}: {what} not valid until {_when(cert.not_valid_before_utc)} — "
            "check this host's clock"
        )
    if now > cert.not_valid_after_utc:
        raise PkiError(f"{path}: {what} expired on {_when(cert.not_valid_after_utc)} — {renew}")


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"
