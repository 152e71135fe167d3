"""The checks of join and renewal requests, and CSR signing (pure; real keys and CSRs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from meshagent.central.joining import (
    BadRequest,
    Forbidden,
    check_csr,
    check_join,
    check_renewal,
    identities,
    sign_csrs,
)
from meshagent.pki.ca import create_ca, uri_sans
from meshagent.pki.csr import make_csr
from meshagent.snapshot.wire import InboundSpec, JoinRequest, OutboundSpec

NOW = datetime(2026, 11, 22, 12, tzinfo=UTC)
ALLOWED = ("web", "orders", "worker")


@cache
def csr(mesh: str, service: str) -> str:
    return make_csr(mesh, service)[0].decode()


def request(**changes: Any) -> JoinRequest:
    base = JoinRequest(
        mesh="shop",
        dataplane="vm-1",
        node="vm-1.prod.example",
        address="10.0.0.1",
        inbounds=[InboundSpec(service="web", port=15443, tags={"version": "v1"})],
        outbounds=[OutboundSpec(service="orders", port=16001, source="web")],
        csrs={"web": csr("shop", "web")},
    )
    return msgspec.structs.replace(base, **changes)


def refused(error: type[Exception], join: JoinRequest, *needles: str) -> str:
    with pytest.raises(error) as caught:
        check_join(join, token_mesh="shop", allowed=ALLOWED)
    text = str(caught.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text
    return text


def test_identities_are_inbound_services_and_outbound_sources() -> None:
    join = request(
        inbounds=[InboundSpec(service="web", port=1), InboundSpec(service="api", port=2)],
        outbounds=[
            OutboundSpec(service="orders", port=3, source="worker"),
            OutboundSpec(service="db", port=4, source="web"),
        ],
    )
    assert identities(join) == ["api", "web", "worker"]


def test_a_valid_request_passes_and_names_its_identities() -> None:
    assert check_join(request(), token_mesh="shop", allowed=ALLOWED) == ["web"]
    only_outbound = request(
        inbounds=[],
        outbounds=[OutboundSpec(service="orders", port=16001, source="worker")],
        csrs={"worker": csr("shop", "worker")},
    )
    assert check_join(only_outbound, token_mesh="shop", allowed=ALLOWED) == ["worker"]
    ipv6 = request(address="fd00::1", node="VM-1")
    assert check_join(ipv6, token_mesh="shop", allowed=ALLOWED) == ["web"]


def test_another_mesh_is_forbidden_without_naming_the_tokens_mesh() -> None:
    text = refused(Forbidden, request(mesh="bank"), "mesh: ", "not valid for mesh bank")
    assert "shop" not in text


@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"dataplane": "VM_1"}, ("dataplane: 'VM_1'", "valid name")),
        ({"dataplane": ""}, ("dataplane: ''",)),
        ({"node": "vm 1"}, ("node: 'vm 1'", "host name")),
        ({"node": "a..b"}, ("node:",)),
        ({"node": "x" * 254}, ("node:",)),
        ({"address": "vm-1.example"}, ("address: 'vm-1.example'", "IP address")),
        ({"inbounds": [InboundSpec(service="Web", port=1)]}, ("inbounds[0].service: 'Web'",)),
        ({"inbounds": [InboundSpec(service="web", port=0)]}, ("inbounds[0].port: 0", "1 to 65535")),
        ({"inbounds": [InboundSpec(service="web", port=65536)]}, ("inbounds[0].port: 65536",)),
        ({"outbounds": [OutboundSpec(service="orders", port=70000, source="web")]},
         ("outbounds[0].port: 70000",)),
        ({"outbounds": [OutboundSpec(service="orders", port=1, source="We b")]},
         ("outbounds[0].source: 'We b'",)),
        ({"outbounds": [OutboundSpec(service="", port=1, source="web")]},
         ("outbounds[0].service: ''",)),
        ({"inbounds": [InboundSpec(service="web", port=1), InboundSpec(service="orders", port=1)],
          "csrs": {"web": csr("shop", "web"), "orders": csr("shop", "orders")}},
         ("inbounds[0].port: 1", "each needs its own")),
        ({"outbounds": [OutboundSpec(service="orders", port=1, source="web"),
                        OutboundSpec(service="orders", port=2, source="web")]},
         ("outbounds[0].service: orders",)),
        ({"inbounds": [], "outbounds": [], "csrs": {}}, ("inbounds, outbounds:",)),
        ({"csrs": {}}, ("csrs: no CSR for web", "one per identity")),
        ({"csrs": {"web": csr("shop", "web"), "orders": csr("shop", "orders")}},
         ("csrs.orders: 'orders' is not an inbound service or outbound source",)),
        ({"csrs": {"web": "not a csr"}}, ("csrs.web: not a PEM certificate signing request",)),
        ({"csrs": {"web": csr("shop", "worker")}},
         ("csrs.web: the CSR asks for service 'worker', not 'web'",)),
    ],
)
def test_malformed_requests_are_bad_requests_naming_the_field(
    changes: dict[str, Any], needles: tuple[str, ...]
) -> None:
    refused(BadRequest, request(**changes), *needles)


def test_identities_outside_the_token_are_forbidden() -> None:
    refused(
        Forbidden,
        request(inbounds=[InboundSpec(service="admin", port=1)], csrs={"admin": csr("shop", "admin")}),
        "inbounds[0].service: this join token does not allow service 'admin'",
        "it allows: orders, web, worker",
    )
    refused(
        Forbidden,
        request(outbounds=[OutboundSpec(service="orders", port=1, source="batch")]),
        "outbounds[0].source: this join token does not allow service 'batch'",
    )


def test_a_csr_for_another_mesh_is_forbidden() -> None:
    refused(Forbidden, request(csrs={"web": csr("bank", "web")}), "csrs.web", "mesh 'bank'")


def _rsa_csr(mesh: str, service: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    built = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{mesh}/service/{service}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return built.public_bytes(serialization.Encoding.PEM).decode()


def test_check_csr_wants_ec_keys() -> None:
    with pytest.raises(BadRequest, match=r"csrs\.web: only EC keys"):
        check_csr("web", _rsa_csr("shop", "web"), mesh="shop")
    check_csr("web", csr("shop", "web"), mesh="shop")


def test_renewal_checks() -> None:
    check_renewal({"web": csr("shop", "web")}, mesh="shop", allowed=ALLOWED)
    with pytest.raises(BadRequest, match="csrs: send at least one"):
        check_renewal({}, mesh="shop", allowed=ALLOWED)
    with pytest.raises(Forbidden, match=r"csrs\.admin: this node credential does not allow"):
        check_renewal({"admin": csr("shop", "admin")}, mesh="shop", allowed=ALLOWED)
    with pytest.raises(Forbidden, match="mesh 'bank'"):
        check_renewal({"web": csr("bank", "web")}, mesh="shop", allowed=ALLOWED)
    with pytest.raises(BadRequest, match="asks for service 'orders'"):
        check_renewal({"web": csr("shop", "orders")}, mesh="shop", allowed=ALLOWED)


def test_sign_csrs_issues_spiffe_certificates_and_the_earliest_expiry() -> None:
    ca = create_ca("shop", now=NOW)
    csrs = {"web": csr("shop", "web"), "worker": csr("shop", "worker")}
    signed = sign_csrs(ca, csrs, mesh="shop", allowed=ALLOWED, now=NOW, ttl=timedelta(hours=2))
    assert sorted(signed.certificates) == ["web", "worker"]
    issuer = x509.load_pem_x509_certificate(ca.cert_pem)
    for service, pem in signed.certificates.items():
        cert = x509.load_pem_x509_certificate(pem.encode())
        cert.verify_directly_issued_by(issuer)
        assert uri_sans(cert) == [f"spiffe://shop/service/{service}"]
    assert signed.not_after == (NOW + timedelta(hours=2)).timestamp()
    with pytest.raises(Forbidden, match=r"csrs\.web: asks for service 'web'; allowed: orders"):
        sign_csrs(ca, csrs, mesh="shop", allowed=["orders"], now=NOW, ttl=timedelta(hours=2))
