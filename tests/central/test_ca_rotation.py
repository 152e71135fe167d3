"""CA rotation through the admin and dataplane APIs, in process (the fixtures of
``test_dataplane_api``: a real SqliteStore, real keys and certificates, an injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from meshagent.pki.ca import create_ca
from meshagent.pki.csr import make_csr
from meshagent.pki.rotation import bundle_fingerprints, ca_fingerprint, fingerprint
from tests.central.test_dataplane_api import Central, agent, central, join

__all__ = ["central"]  # the fixture, used by name


async def config(central: Central, node_token: str, name: str) -> Any:
    return await central.call(
        "GET", f"/v1/dataplanes/shop/{name}/config?wait=0", token=node_token
    )


async def renew(central: Central, node_token: str, name: str) -> Any:
    csr, _ = make_csr("shop", "web")
    return await central.call(
        "POST", f"/v1/dataplanes/shop/{name}/certificates", token=node_token,
        json={"csrs": {"web": csr.decode()}},
    )


async def heartbeat(central: Central, node_token: str, name: str, **report: Any) -> None:
    await central.call(
        "PUT", f"/v1/dataplanes/shop/{name}/status", token=node_token, status=204,
        json={"applied_version": 1, **report},
    )


def issuer_of(certificate_pem: str, bundle_pem: str) -> str:
    cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    for ca in x509.load_pem_x509_certificates(bundle_pem.encode()):
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:
            continue
        return fingerprint(ca)
    return ""


async def joined_pair(central: Central) -> tuple[str, str, str]:
    """Mesh shop with dataplanes vm-1 and vm-2 (service web); their node credentials and
    the mesh's CA fingerprint."""
    mesh = await central.mesh("shop")
    token = await central.join_token("shop", "web", uses=2)
    one = await join(central, token, agent("vm-1"))
    two = await join(central, token, agent("vm-2", address="10.0.0.2"))
    return one["node_token"], two["node_token"], ca_fingerprint(mesh["ca_cert"])


async def test_rotation_signs_with_the_new_ca_and_trusts_both_until_finished(
    central: Central,
) -> None:
    one, two, old = await joined_pair(central)
    views = await central.dataplanes("shop")
    assert views["vm-1"]["on_current_ca"] is True and views["vm-1"]["cert_issuers"] == [old]

    started = await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    new = started["ca_fingerprint"]
    assert started["previous_ca_fingerprint"] == old and new != old
    assert started["in_progress"] is True
    assert started["still_on_previous_ca"] == ["vm-1", "vm-2"]

    # Every dataplane trusts both (new first) and learns which one signs now.
    compiled = await config(central, one, "vm-1")
    assert bundle_fingerprints(compiled["ca_bundle"]) == [new, old]
    assert compiled["signing_ca"] == new
    views = await central.dataplanes("shop")
    assert [views[n]["on_current_ca"] for n in ("vm-1", "vm-2")] == [False, False]

    # A renewal is signed by the new CA; the answer's bundle holds both.
    renewed = await renew(central, one, "vm-1")
    assert issuer_of(renewed["certificates"]["web"], renewed["ca_bundle"]) == new
    assert bundle_fingerprints(renewed["ca_bundle"]) == [new, old]
    assert (await central.dataplanes("shop"))["vm-1"]["on_current_ca"] is True

    # Rotating again before finishing is refused.
    again = await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=409)
    assert "already in progress" in again["error"] and "--finish" in again["error"]

    # vm-2 is online and still on the old CA: finishing is refused, naming it.
    refused = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation/finish", json={}, status=409
    )
    assert "vm-2" in refused["error"] and "vm-1" not in refused["error"]
    assert "--force" in refused["error"]

    # Its agent reports certificates of the new CA (after renewing): now it may finish.
    await heartbeat(central, two, "vm-2", cert_issuers=[new])
    finished = await central.call("POST", "/v1/meshes/shop/ca-rotation/finish", json={})
    assert finished["in_progress"] is False and finished["left_behind"] == []
    compiled = await config(central, one, "vm-1")
    assert bundle_fingerprints(compiled["ca_bundle"]) == [new]
    record = await central.store.get_mesh("shop")
    assert record.previous_ca == b""  # the old CA's key is gone from the store

    actions = [e["action"] for e in (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]]
    assert actions[0] == "mesh.ca_rotation.finish" and "mesh.ca_rotation.start" in actions
    again = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation/finish", json={}, status=409
    )
    assert again["error"] == "mesh shop: no CA rotation in progress"


async def test_offline_dataplanes_do_not_hold_up_the_finish_and_force_skips_the_rest(
    central: Central,
) -> None:
    one, _, _ = await joined_pair(central)
    await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    central.clock.now += 25.0
    await heartbeat(central, one, "vm-1")  # vm-1 online; vm-2 silent
    central.clock.now += 10.0  # vm-2 past the 30 s online window
    status = await central.call("GET", "/v1/meshes/shop/ca-rotation")
    assert status["still_on_previous_ca"] == ["vm-1"]
    await central.call("POST", "/v1/meshes/shop/ca-rotation/finish", json={}, status=409)
    forced = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation/finish", json={"force": True}
    )
    assert forced["left_behind"] == ["vm-1"]
    entry = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"][0]
    assert entry["action"] == "mesh.ca_rotation.finish" and "forced" in entry["detail"]


async def test_provided_rotation_is_checked(central: Central) -> None:
    now = datetime.now(UTC)
    first = create_ca("shop", now=now)
    await central.mesh(
        "shop", ca="provided", ca_cert=first.cert_pem.decode(), ca_key=first.key_pem.decode()
    )
    same = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation", status=400,
        json={"ca": "provided", "ca_cert": first.cert_pem.decode(),
              "ca_key": first.key_pem.decode()},
    )
    assert same["error"] == "ca_cert is the mesh's current CA; rotate to another CA"
    other = create_ca("bank", now=now)
    wrong = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation", status=400,
        json={"ca": "provided", "ca_cert": other.cert_pem.decode(),
              "ca_key": other.key_pem.decode()},
    )
    assert "spiffe://bank" in wrong["error"]
    missing = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation", status=400, json={"ca": "provided"}
    )
    assert "ca_cert and ca_key" in missing["error"]
    second = create_ca("shop", now=now)
    started = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation", status=201,
        json={"ca": "provided", "ca_cert": second.cert_pem.decode(),
              "ca_key": second.key_pem.decode()},
    )
    assert started["ca_fingerprint"] == ca_fingerprint(second.cert_pem)
    mesh = await central.call("GET", "/v1/meshes/shop")
    assert mesh["rotating"] is True and mesh["ca_cert"] == second.cert_pem.decode()


async def test_a_mesh_scoped_admin_rotates_its_mesh_only(central: Central) -> None:
    await central.mesh("shop")
    await central.mesh("bank")
    answer = await central.call(
        "POST", "/v1/tokens/admin", json={"meshes": ["shop"]}, status=201
    )
    scoped = answer["token"]
    await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, token=scoped, status=201)
    for path in ("/v1/meshes/bank/ca-rotation", "/v1/meshes/bank/ca-rotation/finish"):
        hidden = await central.call("POST", path, json={}, token=scoped, status=404)
        assert hidden["error"] == "mesh bank not found"
    await central.call("GET", "/v1/meshes/bank/ca-rotation", token=scoped, status=404)
    await central.call("POST", "/v1/meshes/nope/ca-rotation", json={}, status=404)


async def test_a_status_report_names_real_fingerprints(central: Central) -> None:
    one, _, _ = await joined_pair(central)
    bad = await central.call(
        "PUT", "/v1/dataplanes/shop/vm-1/status", token=one, status=400,
        json={"applied_version": 1, "cert_issuers": ["not-a-fingerprint"]},
    )
    assert bad["error"].startswith("cert_issuers:")
    # An agent whose certificate no CA of its bundle issued says "": not the current CA.
    await heartbeat(central, one, "vm-1", cert_issuers=[""])
    assert (await central.dataplanes("shop"))["vm-1"]["on_current_ca"] is False


async def test_store_keeps_the_previous_key_sealed_during_the_rotation(central: Central) -> None:
    await central.mesh("shop")
    before = await central.store.get_mesh("shop")
    await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    during = await central.store.get_mesh("shop")
    assert during.previous_ca == before.ca and during.ca != before.ca
    assert b"PRIVATE KEY" not in during.ca + during.previous_ca
