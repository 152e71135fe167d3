"""CSRs signed only within a credential's scope; sealed secrets; tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from meshagent.pki.ca import create_ca
from meshagent.pki.csr import CsrRejected, make_csr, renew_at, sign_csr
from meshagent.pki.identity import identities_from_peercert
from meshagent.pki.secrets import (
    SecretError,
    key_from_file_bytes,
    new_key_file_bytes,
    new_token,
    seal,
    token_id_of,
    token_matches,
    unseal,
)

NOW = datetime(2026, 11, 1, tzinfo=UTC)
CA = create_ca("shop", now=NOW)


def test_signed_csr_carries_the_requested_identity_and_key() -> None:
    csr_pem, key_pem = make_csr("shop", "orders")
    service, cert_pem = sign_csr(CA, csr_pem, mesh="shop", allowed_services={"orders"}, now=NOW,
                                 ttl=timedelta(hours=24))
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert service == "orders"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://shop/service/orders"]
    assert cert.public_key() == x509.load_pem_x509_csr(csr_pem).public_key()
    assert b"PRIVATE KEY" in key_pem
    assert identities_from_peercert({"subjectAltName": (("URI", "spiffe://shop/service/orders"),)})


@pytest.mark.parametrize(
    ("mesh", "service", "allowed", "message"),
    [("billing", "orders", {"orders"}, "asks for mesh 'billing'"),
     ("shop", "payments", {"orders", "web"}, "asks for service 'payments'; allowed: orders, web")],
)
def test_csr_outside_the_scope_is_rejected(mesh: str, service: str, allowed: set[str], message: str) -> None:
    csr_pem, _ = make_csr(mesh, service)
    with pytest.raises(CsrRejected, match=message):
        sign_csr(CA, csr_pem, mesh="shop", allowed_services=allowed, now=NOW, ttl=timedelta(hours=1))


def test_garbage_csr_is_rejected() -> None:
    with pytest.raises(CsrRejected, match="not a PEM"):
        sign_csr(CA, b"hello", mesh="shop", allowed_services={"x"}, now=NOW, ttl=timedelta(hours=1))


def test_renewal_at_two_thirds() -> None:
    skew = timedelta(minutes=5)  # certificates are valid from 5 min before issue
    assert renew_at(NOW - skew, NOW + timedelta(hours=24)) == NOW + timedelta(hours=16)
    assert renew_at(NOW - skew, NOW + timedelta(seconds=9)) == NOW + timedelta(seconds=6)
    assert renew_at(NOW, NOW + timedelta(minutes=1)) == NOW + timedelta(minutes=1)


def test_sealed_secrets_need_the_key_and_the_context() -> None:
    key = key_from_file_bytes(new_key_file_bytes())
    blob = seal(key, b"ca private key", context="shop")
    assert unseal(key, blob, context="shop") == b"ca private key"
    with pytest.raises(SecretError, match="wrong key file"):
        unseal(key, blob, context="billing")
    with pytest.raises(SecretError, match="wrong key file"):
        unseal(key_from_file_bytes(new_key_file_bytes()), blob, context="shop")
    with pytest.raises(SecretError, match="not a sealed secret"):
        unseal(key, b"plain", context="shop")
    with pytest.raises(SecretError, match="at least 32"):
        key_from_file_bytes(b"short")


def test_tokens_are_stored_as_digests() -> None:
    for _ in range(300):  # the secret part may itself hold "_" and "-"
        token, token_id, digest = new_token()
        assert token_id_of(token) == token_id and token_id not in digest
    assert token_matches(token, digest) and token_matches(token + "\n", digest)
    assert not token_matches(token[:-1] + "x", digest)
    with pytest.raises(SecretError):
        token_id_of("Bearer nonsense")
