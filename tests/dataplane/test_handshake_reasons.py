"""handshake_reason: real TLS handshakes that fail (in memory, no sockets) get the label
an operator can act on, on the side that saw the failure."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshagent.dataplane.errors import HANDSHAKE_REASONS, handshake_reason
from meshagent.dataplane.tls import IdentityFiles, client_context, server_context
from meshagent.pki.ca import issue_leaf
from meshagent.pki.files import write_private_file, write_public_file
from tests.support.pki import MeshCa, make_ca


def handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[str | None, str | None]:
    """Run a handshake between the two contexts; each side's reason, None if it passed."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    failed: dict[str, str | None] = {"client": None, "server": None}
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", c), ("server", s)):
            if done[name] or failed[name]:
                continue
            try:
                side.do_handshake()
                done[name] = True
                if name == "server":
                    side.read(1)  # TLS 1.3: the client's certificate is checked by now
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                pass
            except ssl.SSLError as exc:
                failed[name] = handshake_reason(exc)
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if (done["client"] or failed["client"]) and (done["server"] or failed["server"]):
            # TLS 1.3 clients finish before the server judged their certificate: read
            # the server's alert, if any.
            try:
                c.read(1)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                failed["client"] = failed["client"] or handshake_reason(exc)
            break
    return failed["client"], failed["server"]


def leaf(ca: MeshCa, service: str, *, now: datetime, tmp: Path) -> IdentityFiles:
    pair = issue_leaf(ca.pair, ca.mesh, service, now=now, ttl=timedelta(hours=1))
    write_public_file(tmp / f"{service}.pem", pair.cert_pem)
    write_private_file(tmp / f"{service}-key.pem", pair.key_pem)
    return IdentityFiles(ca=str(ca.ca_path), cert=str(tmp / f"{service}.pem"),
                         key=str(tmp / f"{service}-key.pem"))


@pytest.fixture
def shop(tmp_path: Path) -> MeshCa:
    return make_ca(tmp_path / "shop", "shop")


def test_the_same_mesh_shakes_hands(shop: MeshCa) -> None:
    assert handshake(client_context(shop.issue("web")), server_context(shop.issue("orders"))) == (None, None)


def test_a_caller_without_a_certificate_is_no_certificate(shop: MeshCa) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(shop.ca_path))
    client.set_alpn_protocols(["meshagent/1"])
    _, server = handshake(client, server_context(shop.issue("orders")))
    assert server == "no-certificate"


def test_another_mesh_is_unknown_ca_on_both_sides(shop: MeshCa, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "billing", "billing")
    client, server = handshake(client_context(other.issue("web")), server_context(shop.issue("orders")))
    assert client == "unknown-ca"  # it does not trust the server's CA
    assert server == "unknown-ca"  # and tells it so in an alert


def test_an_expired_certificate_is_expired(shop: MeshCa, tmp_path: Path) -> None:
    old = leaf(shop, "web", now=datetime.now(UTC) - timedelta(days=2), tmp=tmp_path)
    _, server = handshake(client_context(old), server_context(shop.issue("orders")))
    assert server == "expired"


def test_a_certificate_from_the_future_is_not_yet_valid(shop: MeshCa, tmp_path: Path) -> None:
    future = leaf(shop, "orders", now=datetime.now(UTC) + timedelta(minutes=50), tmp=tmp_path)
    client, _ = handshake(client_context(shop.issue("web")), server_context(future))
    assert client == "not-yet-valid"


def test_plaintext_is_not_tls(shop: MeshCa) -> None:
    incoming = ssl.MemoryBIO()
    server = server_context(shop.issue("orders")).wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
    incoming.write(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
    with pytest.raises(ssl.SSLError) as info:
        server.do_handshake()
    assert handshake_reason(info.value) == "not-tls"


def test_other_failures_have_bounded_labels() -> None:
    assert handshake_reason(ssl.SSLEOFError()) == "closed"
    assert handshake_reason(ConnectionResetError()) == "closed"
    assert handshake_reason(None) == "closed"
    assert handshake_reason(ValueError("?")) == "other"
    for label in ("closed", "other"):
        assert label in HANDSHAKE_REASONS
