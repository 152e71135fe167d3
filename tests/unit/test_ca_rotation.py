"""CA rotation, the pure parts: fingerprints and issuers (pki.rotation), the mesh record's
steps (central.meshes), and the agent's view of its certificates (agent.central)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from cryptography import x509

from meshagent.agent.central import Joined, SigningCa, _save_join, certificate_issuers
from meshagent.central.meshes import (
    MeshError,
    RotationConflict,
    decode_spec,
    finish_rotation,
    mesh_ca,
    new_mesh,
    rotation_view,
    signing_pair,
    start_rotation,
    still_on_previous_ca,
    switch_signer,
    trust_bundle,
)
from meshagent.central.store import DataplaneRecord
from meshagent.pki.ca import create_ca
from meshagent.pki.csr import make_csr, sign_csr
from meshagent.pki.rotation import (
    bundle_fingerprints,
    ca_fingerprint,
    issuer_fingerprint,
    needs_rotation,
    rotation_delay,
)
from meshagent.pki.secrets import key_from_file_bytes, new_key_file_bytes
from meshagent.snapshot.wire import DataplaneConfig

NOW = datetime(2026, 12, 1, tzinfo=UTC)
SEAL = key_from_file_bytes(new_key_file_bytes())


def leaf(ca_pem: bytes, key_pem: bytes, service: str = "web") -> tuple[str, bytes]:
    from meshagent.pki.ca import PemPair

    csr, key = make_csr("shop", service)
    _, cert = sign_csr(
        PemPair(ca_pem, key_pem), csr, mesh="shop", allowed_services=[service], now=NOW,
        ttl=timedelta(hours=1),
    )
    return cert.decode(), key


def dataplane(name: str, *issuers: str, last_seen: float = 100.0) -> DataplaneRecord:
    return DataplaneRecord(
        mesh="shop", name=name, node=name, address="10.0.0.1", spec=b"{}",
        last_seen=last_seen, cert_issuers=issuers,
    )


# ---------------------------------------------------------------------------- pki.rotation


def test_issuer_is_found_by_signature_not_by_name() -> None:
    old, new = create_ca("shop", now=NOW), create_ca("shop", now=NOW)
    # Same subject name: only the signature tells them apart.
    old_cert = x509.load_pem_x509_certificate(old.cert_pem)
    new_cert = x509.load_pem_x509_certificate(new.cert_pem)
    assert old_cert.subject == new_cert.subject
    cert_pem, _ = leaf(new.cert_pem, new.key_pem)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    assert issuer_fingerprint(cert, [old_cert, new_cert]) == ca_fingerprint(new.cert_pem)
    assert issuer_fingerprint(cert, [old_cert]) == ""
    assert bundle_fingerprints(old.cert_pem + new.cert_pem) == [
        ca_fingerprint(old.cert_pem), ca_fingerprint(new.cert_pem)
    ]
    assert bundle_fingerprints("") == []
    assert len(ca_fingerprint(old.cert_pem)) == 64


def test_needs_rotation_only_for_a_known_other_signing_ca() -> None:
    assert not needs_rotation(["a"], "")  # the central agent does not say: never
    assert not needs_rotation(["a"], "a")
    assert needs_rotation(["a", "b"], "b")
    assert needs_rotation([""], "b")  # a certificate of no CA in the bundle


def test_rotation_delay_is_spread_and_bounded() -> None:
    rng = random.Random(7)
    delays = [rotation_delay(60.0, rng) for _ in range(1000)]
    assert all(0.0 <= d <= 60.0 for d in delays)
    assert min(delays) < 6.0 and max(delays) > 54.0  # spread over the window
    assert rotation_delay(0.0, rng) == 0.0
    assert rotation_delay(float("nan"), rng) == 0.0


# ---------------------------------------------------------------------------- central.meshes


def test_start_then_finish_a_rotation() -> None:
    record = new_mesh("shop", mtls="strict", ca="builtin", seal_key=SEAL, now=1.0)
    old_pem = decode_spec(record).ca_cert
    rotated = start_rotation(record, ca="builtin", seal_key=SEAL, now=2.0)
    spec = decode_spec(rotated)
    assert spec.previous_ca_cert == old_pem and spec.ca_cert != old_pem
    assert spec.rotation_started_at == 2.0 and spec.mtls == "strict"
    assert rotated.previous_ca == record.ca  # the old key, still sealed
    assert mesh_ca(rotated, SEAL).cert_pem.decode() == spec.ca_cert
    # Distributing: the old CA still signs, with its own key.
    assert spec.rotation_phase == "distributing" and spec.bundle_revision == 0
    assert signing_pair(rotated, SEAL) == mesh_ca(record, SEAL)
    with pytest.raises(RotationConflict, match="still being distributed"):
        finish_rotation(rotated, [], is_online=lambda d: True, force=True)
    rotated = switch_signer(rotated, now=2.5)
    assert signing_pair(rotated, SEAL).cert_pem.decode() == spec.ca_cert  # the new one signs
    assert bundle_fingerprints(trust_bundle(spec)) == [
        ca_fingerprint(spec.ca_cert), ca_fingerprint(old_pem)
    ]
    with pytest.raises(RotationConflict, match="already in progress"):
        start_rotation(rotated, ca="builtin", seal_key=SEAL, now=3.0)

    new_fp, old_fp = ca_fingerprint(spec.ca_cert), ca_fingerprint(old_pem)
    online = lambda d: d.last_seen > 50  # noqa: E731
    dataplanes = [
        dataplane("a", new_fp),
        dataplane("b", old_fp, new_fp),  # one certificate still old
        dataplane("c"),  # never said
        dataplane("d", old_fp, last_seen=10.0),  # offline: does not hold it up
    ]
    assert still_on_previous_ca(rotated, dataplanes, is_online=online) == ["b", "c"]
    with pytest.raises(RotationConflict) as refused:
        finish_rotation(rotated, dataplanes, is_online=online)
    assert "2 online dataplane(s)" in str(refused.value) and "b, c" in str(refused.value)
    assert "\n" not in str(refused.value)
    finished = finish_rotation(rotated, dataplanes, is_online=online, force=True)
    assert finished.previous_ca == b"" and decode_spec(finished).previous_ca_cert == ""
    assert trust_bundle(decode_spec(finished)) == spec.ca_cert
    assert rotation_view(finished, dataplanes, is_online=online)["in_progress"] is False
    with pytest.raises(RotationConflict, match="no CA rotation in progress"):
        finish_rotation(finished, [], is_online=online)


def test_finish_names_at_most_ten_dataplanes() -> None:
    record = switch_signer(
        start_rotation(
            new_mesh("shop", mtls="strict", ca="builtin", seal_key=SEAL, now=1.0),
            ca="builtin", seal_key=SEAL, now=2.0,
        ),
        now=3.0,
    )
    many = [dataplane(f"vm-{i:02}") for i in range(12)]
    with pytest.raises(RotationConflict) as refused:
        finish_rotation(record, many, is_online=lambda d: True)
    assert "vm-09 and 2 more" in str(refused.value) and "vm-10" not in str(refused.value)


def test_a_provided_ca_must_differ_and_belong_to_the_mesh() -> None:
    first = create_ca("shop", now=NOW)
    record = new_mesh(
        "shop", mtls="strict", ca="provided", seal_key=SEAL, now=1.0,
        ca_cert=first.cert_pem.decode(), ca_key=first.key_pem.decode(),
    )
    with pytest.raises(MeshError, match="current CA"):
        start_rotation(
            record, ca="provided", seal_key=SEAL, now=2.0,
            ca_cert=first.cert_pem.decode(), ca_key=first.key_pem.decode(),
        )
    with pytest.raises(MeshError, match="go with"):
        start_rotation(
            record, ca="builtin", seal_key=SEAL, now=2.0, ca_cert=first.cert_pem.decode()
        )
    rotated = start_rotation(record, ca="builtin", seal_key=SEAL, now=2.0)
    assert decode_spec(rotated).ca == "builtin"


# ---------------------------------------------------------------------------- agent.central


def test_the_agent_finds_the_issuers_of_its_certificates(tmp_path: Path) -> None:
    old, new = create_ca("shop", now=NOW), create_ca("shop", now=NOW)
    joined = Joined(
        directory=tmp_path / "central", url="https://c", mesh="shop", dataplane="vm-1",
        identities=["orders", "web"], node_token="t",
        ca_bundle=(new.cert_pem + old.cert_pem).decode(),
    )
    web, web_key = leaf(old.cert_pem, old.key_pem, "web")
    orders, orders_key = leaf(new.cert_pem, new.key_pem, "orders")
    _save_join(joined, {"web": web, "orders": orders},
               {"web": (b"", web_key), "orders": (b"", orders_key)})
    assert certificate_issuers(joined) == sorted(
        [ca_fingerprint(old.cert_pem), ca_fingerprint(new.cert_pem)]
    )
    joined.ca_bundle = new.cert_pem.decode()  # the old CA dropped: its certificate is ""
    assert certificate_issuers(joined) == sorted(["", ca_fingerprint(new.cert_pem)])


async def test_signing_ca_wakes_the_renewer_only_on_a_change() -> None:
    signing = SigningCa()
    first = signing.changed
    config = DataplaneConfig(version=3, mesh="shop", signing_ca="ab" * 32, ca_bundle="X")
    signing.update(config)
    assert first.is_set() and not signing.changed.is_set()
    assert (signing.fingerprint, signing.spread_seconds) == ("ab" * 32, 60.0)
    second = signing.changed
    signing.update(msgspec.structs.replace(config, version=4))
    assert not second.is_set()  # nothing the renewer cares about changed
    signing.update(msgspec.structs.replace(config, rotation_spread_seconds=-1.0))
    assert second.is_set() and signing.spread_seconds == 120.0
