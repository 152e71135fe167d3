"""meshagent.pki: identities, CA issuance, certificate files and checks, real TLS."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from meshagent.pki.ca import (
    CLOCK_SKEW,
    PemPair,
    ca_trust_domain,
    create_ca,
    issue_leaf,
    issue_leaf_for_public_key,
)
from meshagent.pki.files import (
    CheckedIdentity,
    PkiError,
    check_identity_files,
    load_ca,
    load_certificate,
    load_private_key,
    write_private_file,
    write_public_file,
)
from meshagent.pki.identity import (
    NAME_RULE,
    ServiceIdentity,
    identities_from_peercert,
    is_valid_name,
    parse_spiffe_id,
    spiffe_id,
)

E = TypeVar("E", bound=x509.ExtensionType)
NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
NAMES = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", fullmatch=True)


@pytest.fixture(scope="module")
def ca() -> PemPair:
    return create_ca("shop", now=NOW)


def cert_of(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


# --- identity -----------------------------------------------------------------------


def test_spiffe_id() -> None:
    assert spiffe_id("shop", "web") == "spiffe://shop/service/web"
    assert ServiceIdentity("shop", "web").uri == "spiffe://shop/service/web"


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("web", True),
        ("a", True),
        ("0", True),
        ("web-2", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("", False),
        ("-web", False),
        ("web-", False),
        ("Web", False),
        ("we_b", False),
        ("we.b", False),
        ("web\n", False),
        ("wéb", False),
    ],
)
def test_is_valid_name(name: str, valid: bool) -> None:
    assert is_valid_name(name) is valid


@pytest.mark.parametrize(("mesh", "service"), [("Shop", "web"), ("shop", "web_1"), ("", "web")])
def test_spiffe_id_rejects_bad_names(mesh: str, service: str) -> None:
    with pytest.raises(ValueError, match=r"invalid (mesh|service) name") as info:
        spiffe_id(mesh, service)
    assert NAME_RULE in str(info.value)


@pytest.mark.parametrize(
    ("uri", "mesh", "service"),
    [
        ("spiffe://shop/service/web", "shop", "web"),
        ("spiffe://a/service/b", "a", "b"),
        ("spiffe://mesh-1/service/orders-v2", "mesh-1", "orders-v2"),
        (f"spiffe://{'m' * 63}/service/{'s' * 63}", "m" * 63, "s" * 63),
    ],
)
def test_parse_spiffe_id(uri: str, mesh: str, service: str) -> None:
    assert parse_spiffe_id(uri) == ServiceIdentity(mesh, service)


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://shop",
        "spiffe://shop/",
        "spiffe://shop/service",
        "spiffe://shop/service/",
        "spiffe://shop/service/web/",
        "spiffe://shop/service/web/extra",
        "spiffe://shop/svc/web",
        "spiffe:///service/web",
        "spiffe://Shop/service/web",
        "spiffe://shop/service/Web",
        "spiffe://shop/service/-web",
        "spiffe://shop/service/web?x=1",
        "spiffe://shop/service/web#frag",
        "spiffe://shop:8443/service/web",
        "spiffe://user@shop/service/web",
        f"spiffe://shop/service/{'s' * 64}",
        "SPIFFE://shop/service/web",
        "https://shop/service/web",
        " spiffe://shop/service/web",
        "spiffe://shop/service/web\n",
    ],
)
def test_parse_spiffe_id_rejects(uri: str) -> None:
    with pytest.raises(ValueError, match=r"invalid SPIFFE ID .*spiffe://<mesh>|invalid SPIFFE ID"):
        parse_spiffe_id(uri)


def test_parse_error_says_what_is_expected() -> None:
    with pytest.raises(ValueError) as info:
        parse_spiffe_id("spiffe://shop/svc/web")
    assert str(info.value) == (
        'invalid SPIFFE ID "spiffe://shop/svc/web": expected spiffe://<mesh>/service/<service>'
    )


@given(mesh=NAMES, service=NAMES)
def test_spiffe_id_round_trips(mesh: str, service: str) -> None:
    identity = parse_spiffe_id(spiffe_id(mesh, service))
    assert (identity.mesh, identity.service) == (mesh, service)
    assert identity.uri == spiffe_id(mesh, service)


def test_service_identity_is_frozen_and_validated() -> None:
    identity = ServiceIdentity("shop", "web")
    with pytest.raises(AttributeError):
        identity.mesh = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="invalid service name"):
        ServiceIdentity("shop", "WEB")


def test_identities_from_peercert() -> None:
    peercert: dict[str, object] = {
        "subject": ((("commonName", "web"),),),
        "subjectAltName": (
            ("DNS", "web.example"),
            ("URI", "spiffe://shop/service/web"),
            ("IP Address", "10.0.0.1"),
            ("URI", "https://example.com"),
        ),
    }
    assert identities_from_peercert(peercert) == [
        "spiffe://shop/service/web",
        "https://example.com",
    ]
    assert identities_from_peercert({}) == []
    assert identities_from_peercert(None) == []
    assert identities_from_peercert({"subject": ()}) == []


# --- CA and issuance ----------------------------------------------------------------


def test_ca_certificate(ca: PemPair) -> None:
    cert = cert_of(ca.cert_pem)
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://shop"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meshagent shop CA"
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)
    key = serialization.load_pem_private_key(ca.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert ca_trust_domain(ca.cert_pem) == "shop"


def test_ca_validity_is_configurable() -> None:
    pair = create_ca("shop", now=NOW, valid_for=30 * DAY)
    assert cert_of(pair.cert_pem).not_valid_after_utc == NOW + 30 * DAY


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mesh": "Shop"}, "invalid mesh name"),
        ({"valid_for": timedelta(0)}, "more than 0"),
        ({"valid_for": timedelta(days=10**8)}, "too long"),
        ({"now": datetime(2030, 1, 1)}, "timezone-aware"),
    ],
)
def test_create_ca_rejects(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"mesh": "shop", "now": NOW} | kwargs
    with pytest.raises(ValueError, match=message):
        create_ca(**args)  # type: ignore[arg-type]


def test_pem_pair_repr_hides_the_key(ca: PemPair) -> None:
    assert "PRIVATE" not in repr(ca)


def test_leaf_certificate(ca: PemPair) -> None:
    leaf = issue_leaf(ca, "shop", "web", now=NOW, ttl=30 * DAY)
    cert, ca_cert = cert_of(leaf.cert_pem), cert_of(ca.cert_pem)
    cert.verify_directly_issued_by(ca_cert)
    assert cert.issuer == ca_cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web"
    san = ext(cert, x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://shop/service/web")]
    basic = ext(cert, x509.BasicConstraints)
    assert basic.critical and not basic.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    assert cert.not_valid_before_utc == NOW - CLOCK_SKEW
    assert cert.not_valid_after_utc == NOW + 30 * DAY
    key = serialization.load_pem_private_key(leaf.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()


def test_leaves_get_fresh_keys_and_random_serials(ca: PemPair) -> None:
    one, two = (issue_leaf(ca, "shop", "web", now=NOW, ttl=DAY) for _ in range(2))
    assert one.key_pem != two.key_pem
    assert cert_of(one.cert_pem).serial_number != cert_of(two.cert_pem).serial_number


def test_leaf_does_not_outlive_the_ca() -> None:
    short_ca = create_ca("shop", now=NOW, valid_for=10 * DAY)
    leaf = issue_leaf(short_ca, "shop", "web", now=NOW + 5 * DAY, ttl=30 * DAY)
    expected = cert_of(short_ca.cert_pem).not_valid_after_utc
    assert cert_of(leaf.cert_pem).not_valid_after_utc == expected


def test_issue_for_public_key_made_elsewhere(ca: PemPair) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pem = issue_leaf_for_public_key(ca, "shop", "orders", ec_key.public_key(), now=NOW, ttl=DAY)
    cert = cert_of(pem)
    assert cert.public_key() == ec_key.public_key()
    assert not ext(cert, x509.KeyUsage).value.key_encipherment
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_cert = cert_of(
        issue_leaf_for_public_key(ca, "shop", "orders", rsa_key.public_key(), now=NOW, ttl=DAY)
    )
    assert ext(rsa_cert, x509.KeyUsage).value.key_encipherment


@pytest.mark.parametrize(
    ("mesh", "service", "ttl", "message"),
    [
        ("other", "web", DAY, 'refusing to issue for mesh "other": this CA is for mesh "shop"'),
        ("shop", "Web", DAY, "invalid service name"),
        ("shop", "web", timedelta(0), "more than 0"),
        ("shop", "web", -DAY, "more than 0"),
    ],
)
def test_issue_rejects(ca: PemPair, mesh: str, service: str, ttl: timedelta, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        issue_leaf(ca, mesh, service, now=NOW, ttl=ttl)


def test_issue_refuses_expired_ca(ca: PemPair) -> None:
    with pytest.raises(ValueError, match="the CA expired on 2040-05-29 12:00 UTC; create a new CA"):
        issue_leaf(ca, "shop", "web", now=NOW + timedelta(days=3651), ttl=DAY)


def test_issue_refuses_unusable_key(ca: PemPair) -> None:
    key = x25519.X25519PrivateKey.generate()
    with pytest.raises(ValueError, match="cannot certify"):
        issue_leaf_for_public_key(ca, "shop", "web", key.public_key(), now=NOW, ttl=DAY)


def test_issue_refuses_mismatched_ca_pair(ca: PemPair) -> None:
    other = create_ca("shop", now=NOW)
    with pytest.raises(ValueError, match="does not belong to the CA certificate"):
        issue_leaf(PemPair(ca.cert_pem, other.key_pem), "shop", "web", now=NOW, ttl=DAY)


def test_issue_refuses_a_leaf_as_ca(ca: PemPair) -> None:
    leaf = issue_leaf(ca, "shop", "web", now=NOW, ttl=DAY)
    with pytest.raises(ValueError, match="is not a CA certificate"):
        issue_leaf(leaf, "shop", "web", now=NOW, ttl=DAY)


def test_ca_trust_domain_requires_the_san(ca: PemPair) -> None:
    leaf = issue_leaf(ca, "shop", "web", now=NOW, ttl=DAY)
    with pytest.raises(ValueError, match="no spiffe://<mesh> URI SAN"):
        ca_trust_domain(leaf.cert_pem)
    with pytest.raises(ValueError, match="not a PEM certificate"):
        ca_trust_domain(b"garbage")


# --- files --------------------------------------------------------------------------


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_write_modes_ignore_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        write_private_file(tmp_path / "key.pem", b"secret")
        write_public_file(tmp_path / "cert.pem", b"public")
    finally:
        os.umask(old)
    assert mode(tmp_path / "key.pem") == 0o600
    assert mode(tmp_path / "cert.pem") == 0o644


def test_write_replaces_atomically(tmp_path: Path) -> None:
    target = tmp_path / "key.pem"
    target.write_bytes(b"old")
    target.chmod(0o666)
    write_private_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem"]  # no temp files left


def test_write_into_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "key.pem"
    with pytest.raises(PkiError, match=f"^{target}: cannot write"):
        write_private_file(target, b"x")


class Layout:
    """A CA and a leaf for shop/web, written to disk."""

    def __init__(self, root: Path, ca: PemPair, leaf: PemPair) -> None:
        self.ca_dir = root / "ca"
        self.ca_dir.mkdir()
        self.ca_path = self.ca_dir / "ca.pem"
        self.cert_path = root / "web.pem"
        self.key_path = root / "web-key.pem"
        write_public_file(self.ca_path, ca.cert_pem)
        write_private_file(self.ca_dir / "ca-key.pem", ca.key_pem)
        self.write(leaf)

    def write(self, leaf: PemPair) -> None:
        write_public_file(self.cert_path, leaf.cert_pem)
        write_private_file(self.key_path, leaf.key_pem)

    def check(
        self, *, mesh: str = "shop", service: str | None = "web", now: datetime = NOW
    ) -> CheckedIdentity:
        return check_identity_files(
            self.ca_path, self.cert_path, self.key_path, mesh=mesh, service=service, now=now
        )


@pytest.fixture
def layout(tmp_path: Path, ca: PemPair) -> Layout:
    return Layout(tmp_path, ca, issue_leaf(ca, "shop", "web", now=NOW, ttl=30 * DAY))


def test_round_trip_through_files(layout: Layout, ca: PemPair) -> None:
    assert load_ca(layout.ca_dir) == ca
    assert mode(layout.key_path) == 0o600 and mode(layout.ca_dir / "ca-key.pem") == 0o600
    assert mode(layout.cert_path) == 0o644
    cert = load_certificate(layout.cert_path)
    assert load_private_key(layout.key_path).public_key() == cert.public_key()
    checked = layout.check()
    assert checked == CheckedIdentity("spiffe://shop/service/web", NOW + 30 * DAY)
    assert layout.check(service=None) == checked
    assert layout.check(now=NOW + 30 * DAY - timedelta(seconds=1)) == checked


def expect(check: Callable[[], object], message: str) -> None:
    """``check`` raises a one-line PkiError equal to, or starting with, ``message``."""
    with pytest.raises(PkiError) as info:
        check()
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_missing_file(layout: Layout) -> None:
    layout.key_path.unlink()
    expect(layout.check, f"{layout.key_path}: no such file — check the [tls] paths")


def test_unreadable_file(layout: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root reads any file, so simulate the permission error rather than chmod 000.
    real = Path.read_bytes

    def read_bytes(path: Path) -> bytes:
        if path == layout.cert_path:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    expect(layout.check, f"{layout.cert_path}: permission denied — make it readable")


def test_directory_instead_of_file(layout: Layout) -> None:
    layout.cert_path.unlink()
    layout.cert_path.mkdir()
    expect(layout.check, f"{layout.cert_path}: is a directory")


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"-----BEGIN CERTIFICATE-----\nxx\n"])
def test_garbage_certificate(layout: Layout, content: bytes) -> None:
    layout.cert_path.write_bytes(content)
    expect(layout.check, f"{layout.cert_path}: not a PEM certificate")


def test_garbage_key(layout: Layout) -> None:
    layout.key_path.write_bytes(b"\x00\x01binary")
    expect(layout.check, f"{layout.key_path}: not a PEM private key")


def test_swapped_cert_and_key(layout: Layout) -> None:
    expect(
        lambda: check_identity_files(
            layout.ca_path, layout.key_path, layout.cert_path, mesh="shop", service="web", now=NOW
        ),
        f"{layout.key_path}: holds a private key, not a certificate",
    )
    expect(lambda: load_private_key(layout.cert_path), f"{layout.cert_path}: holds a certificate")


def test_encrypted_key(layout: Layout) -> None:
    key = load_private_key(layout.key_path)
    layout.key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"password"),
        )
    )
    expect(layout.check, f"{layout.key_path}: the key is encrypted")


def test_key_does_not_match(layout: Layout, ca: PemPair) -> None:
    other = issue_leaf(ca, "shop", "web", now=NOW, ttl=DAY)
    layout.key_path.write_bytes(other.key_pem)
    expect(layout.check, f"{layout.key_path}: not the key of {layout.cert_path}")


def test_wrong_ca(layout: Layout) -> None:
    stranger = create_ca("shop", now=NOW)
    layout.write(issue_leaf(stranger, "shop", "web", now=NOW, ttl=DAY))
    expect(layout.check, f"{layout.cert_path}: not signed by the CA in {layout.ca_path}")


def test_expired(layout: Layout, ca: PemPair) -> None:
    layout.write(issue_leaf(ca, "shop", "web", now=NOW - 60 * DAY, ttl=DAY))
    expect(
        layout.check,
        f"{layout.cert_path}: certificate expired on 2030-04-03 12:00 UTC — issue one with: "
        "meshagent pki issue --mesh shop --service web",
    )


def test_not_yet_valid(layout: Layout, ca: PemPair) -> None:
    layout.write(issue_leaf(ca, "shop", "web", now=NOW + DAY, ttl=DAY))
    expect(layout.check, f"{layout.cert_path}: certificate not valid until 2030-06-02 11:55 UTC")


def test_ca_expired(tmp_path: Path) -> None:
    short_ca = create_ca("shop", now=NOW, valid_for=DAY)
    layout = Layout(tmp_path, short_ca, issue_leaf(short_ca, "shop", "web", now=NOW, ttl=DAY))
    expect(lambda: layout.check(now=NOW + 2 * DAY), f"{layout.ca_path}: CA certificate expired")


def sign_with_sans(ca: PemPair, uris: list[str]) -> PemPair:
    """A leaf signed by ``ca`` with arbitrary URI SANs (none: no SAN extension)."""
    ca_cert = cert_of(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
    )
    if uris:
        names = [x509.UniformResourceIdentifier(uri) for uri in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return PemPair(
        builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key_pem
    )


@pytest.mark.parametrize(
    ("uris", "message"),
    [
        ([], "certificate has no spiffe:// URI SANs"),
        (["https://shop/service/web"], "certificate has no spiffe:// URI SANs"),
        (["spiffe://shop/service/web", "spiffe://shop/service/db"], "certificate has 2 spiffe"),
        (["spiffe://shop/workload/web"], 'invalid SPIFFE ID "spiffe://shop/workload/web"'),
    ],
)
def test_no_usable_spiffe_id(layout: Layout, ca: PemPair, uris: list[str], message: str) -> None:
    layout.write(sign_with_sans(ca, uris))
    expect(layout.check, f"{layout.cert_path}: {message}")


def test_wrong_mesh(tmp_path: Path) -> None:
    other_ca = create_ca("other", now=NOW)
    layout = Layout(tmp_path, other_ca, issue_leaf(other_ca, "other", "web", now=NOW, ttl=DAY))
    expect(
        layout.check,
        f"{layout.cert_path}: certificate is for spiffe://other/service/web, but this agent is "
        'in mesh "shop" — issue one with: meshagent pki issue --mesh shop --service web',
    )


def test_wrong_service(layout: Layout) -> None:
    with pytest.raises(PkiError) as info:
        layout.check(service="orders")
    assert str(info.value) == (
        f"{layout.cert_path}: certificate is for spiffe://shop/service/web, but this inbound "
        'serves "orders" — issue one with: meshagent pki issue --service orders'
    )


def test_load_ca_errors(tmp_path: Path, ca: PemPair) -> None:
    expect(lambda: load_ca(tmp_path), f"{tmp_path / 'ca.pem'}: no such file — create a CA with:")
    write_public_file(tmp_path / "ca.pem", ca.cert_pem)
    write_private_file(tmp_path / "ca-key.pem", create_ca("shop", now=NOW).key_pem)
    expect(lambda: load_ca(tmp_path), f"{tmp_path / 'ca-key.pem'}: not the key of")


# --- a real TLS handshake -----------------------------------------------------------


def tls_context(server: bool, ca: PemPair, pair: PemPair, tmp: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=ca.cert_pem.decode())
    name = "server" if server else "client"
    write_public_file(tmp / f"{name}.pem", pair.cert_pem)
    write_private_file(tmp / f"{name}-key.pem", pair.key_pem)
    ctx.load_cert_chain(tmp / f"{name}.pem", tmp / f"{name}-key.pem")
    return ctx


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> ssl.SSLObject:
    """Run a TLS handshake over memory BIOs; return the server side."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(to_server, from_server, server_side=True)
    client = client_ctx.wrap_bio(to_client, from_client, server_side=False)
    pending = [client, server]
    for _ in range(10):
        for side in list(pending):
            try:
                side.do_handshake()
                pending.remove(side)
            except ssl.SSLWantReadError:
                pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if not pending:
            return server
    raise AssertionError("handshake did not finish")


def test_tls_handshake_with_issued_certificates(tmp_path: Path) -> None:
    now = datetime.now(UTC)  # OpenSSL checks validity against the real clock
    ca = create_ca("shop", now=now)
    server_ctx = tls_context(True, ca, issue_leaf(ca, "shop", "orders", now=now, ttl=DAY), tmp_path)
    client_ctx = tls_context(False, ca, issue_leaf(ca, "shop", "web", now=now, ttl=DAY), tmp_path)
    server = handshake(server_ctx, client_ctx)
    assert identities_from_peercert(server.getpeercert()) == ["spiffe://shop/service/web"]
    assert parse_spiffe_id(identities_from_peercert(server.getpeercert())[0]).service == "web"


def test_tls_rejects_a_client_from_another_ca(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca, stranger = create_ca("shop", now=now), create_ca("shop", now=now)
    server_ctx = tls_context(True, ca, issue_leaf(ca, "shop", "orders", now=now, ttl=DAY), tmp_path)
    client_ctx = tls_context(
        False, ca, issue_leaf(stranger, "shop", "web", now=now, ttl=DAY), tmp_path
    )
    with pytest.raises(ssl.SSLError):
        handshake(server_ctx, client_ctx)
