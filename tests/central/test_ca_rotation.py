"""CA rotation through the admin and dataplane APIs, in process (the fixtures of
``test_dataplane_api``: a real SqliteStore, real keys and certificates, an injected clock)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from cryptography import x509

from meshagent.central.jobs import CaRotationSwitch
from meshagent.central.meshes import decode_spec, encode_spec
from meshagent.pki.ca import create_ca
from meshagent.pki.csr import make_csr
from meshagent.pki.rotation import bundle_fingerprints, ca_fingerprint, fingerprint
from tests.central.test_dataplane_api import Central, agent, central, join

__all__ = ["central"]  # the fixture, used by name

TIMEOUT = 300.0  # the leader job's ca_rotation_switch_timeout in these tests


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


async def switch(central: Central) -> int:
    """One run of the leader job that switches the signer; how many meshes it switched."""
    return await CaRotationSwitch(central.store, timeout_seconds=TIMEOUT)(central.clock())


async def apply_bundle(central: Central, node_token: str, name: str, **report: Any) -> None:
    """The agent applied the latest config, which carries the new bundle."""
    latest = await central.store.mesh_revision("shop")
    await heartbeat(central, node_token, name, applied_version=latest, **report)


async def test_rotation_distributes_then_signs_with_the_new_ca_and_trusts_both_until_finished(
    central: Central,
) -> None:
    one, two, old = await joined_pair(central)
    views = await central.dataplanes("shop")
    assert views["vm-1"]["on_current_ca"] is True and views["vm-1"]["cert_issuers"] == [old]
    assert views["vm-1"]["has_new_bundle"] is None

    started = await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    new = started["ca_fingerprint"]
    assert started["previous_ca_fingerprint"] == old and new != old
    assert started["in_progress"] is True and started["phase"] == "distributing"
    assert started["signing_ca_fingerprint"] == old
    # Read after the rotation was stored; recording it was one more revision step.
    assert started["bundle_revision"] == await central.store.mesh_revision("shop") - 1
    assert started["waiting_for_bundle"] == ["vm-1", "vm-2"]
    assert started["still_on_previous_ca"] == ["vm-1", "vm-2"]

    # Every dataplane trusts both (new first); the OLD CA still signs.
    compiled = await config(central, one, "vm-1")
    assert bundle_fingerprints(compiled["ca_bundle"]) == [new, old]
    assert compiled["signing_ca"] == old
    assert compiled["version"] >= started["bundle_revision"]
    renewed = await renew(central, one, "vm-1")
    assert issuer_of(renewed["certificates"]["web"], renewed["ca_bundle"]) == old
    assert bundle_fingerprints(renewed["ca_bundle"]) == [new, old]
    listed = await central.call("GET", "/v1/meshes/shop/dataplanes")
    assert listed["ca_rotation_phase"] == "distributing"
    assert [d["has_new_bundle"] for d in listed["dataplanes"]] == [False, False]

    # Finishing is refused while distributing, forced or not.
    for force in (False, True):
        refused = await central.call(
            "POST", "/v1/meshes/shop/ca-rotation/finish", json={"force": force}, status=409
        )
        assert "still being distributed" in refused["error"]
        assert "waiting for: vm-1, vm-2" in refused["error"]

    # vm-1 applied the new bundle; vm-2 (online) has not: no switch.
    await apply_bundle(central, one, "vm-1")
    assert await switch(central) == 0
    status = await central.call("GET", "/v1/meshes/shop/ca-rotation")
    assert status["phase"] == "distributing" and status["waiting_for_bundle"] == ["vm-2"]
    assert (await central.dataplanes("shop"))["vm-1"]["has_new_bundle"] is True

    # vm-2 too: the leader switches the signer, once.
    await apply_bundle(central, two, "vm-2")
    assert await switch(central) == 1
    assert await switch(central) == 0
    status = await central.call("GET", "/v1/meshes/shop/ca-rotation")
    assert status["phase"] == "renewing" and status["signing_ca_fingerprint"] == new
    assert status["switched_at"] == central.clock() and status["waiting_for_bundle"] == []
    entry = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"][0]
    assert entry["action"] == "mesh.ca_rotation.switch" and entry["actor"] == "central"
    assert "every online dataplane has the new bundle" in entry["detail"]
    compiled = await config(central, one, "vm-1")
    assert compiled["signing_ca"] == new
    assert bundle_fingerprints(compiled["ca_bundle"]) == [new, old]
    assert (await central.dataplanes("shop"))["vm-1"]["has_new_bundle"] is None

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
    assert finished["phase"] is None
    compiled = await config(central, one, "vm-1")
    assert bundle_fingerprints(compiled["ca_bundle"]) == [new]
    assert compiled["signing_ca"] == new
    record = await central.store.get_mesh("shop")
    assert record.previous_ca == b""  # the old CA's key is gone from the store

    actions = [e["action"] for e in (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]]
    assert actions[0] == "mesh.ca_rotation.finish"
    assert actions.index("mesh.ca_rotation.switch") < actions.index("mesh.ca_rotation.start")
    again = await central.call(
        "POST", "/v1/meshes/shop/ca-rotation/finish", json={}, status=409
    )
    assert again["error"] == "mesh shop: no CA rotation in progress"


async def test_an_offline_dataplane_does_not_hold_up_the_switch(central: Central) -> None:
    one, _, _ = await joined_pair(central)
    await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    central.clock.now += 25.0
    await apply_bundle(central, one, "vm-1")  # vm-1 online with the bundle; vm-2 silent
    assert await switch(central) == 0  # vm-2 still within its online window
    central.clock.now += 10.0  # vm-2 past the 30 s online window
    assert await switch(central) == 1
    entry = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"][0]
    assert entry["action"] == "mesh.ca_rotation.switch" and "timed out" not in entry["detail"]


async def test_the_switch_times_out_naming_who_has_not_applied_the_bundle(
    central: Central,
) -> None:
    one, two, old = await joined_pair(central)
    started = await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    await apply_bundle(central, one, "vm-1")
    for _ in range(int(TIMEOUT // 20) - 1):  # vm-2 stays online on an old config
        central.clock.now += 20.0
        await heartbeat(central, one, "vm-1", applied_version=started["bundle_revision"])
        await heartbeat(central, two, "vm-2", applied_version=1)
        assert await switch(central) == 0
    central.clock.now += 20.0  # TIMEOUT after the start
    assert await switch(central) == 1
    status = await central.call("GET", "/v1/meshes/shop/ca-rotation")
    assert status["phase"] == "renewing" and status["signing_ca_fingerprint"] != old
    entry = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"][0]
    assert entry["action"] == "mesh.ca_rotation.switch"
    assert "timed out" in entry["detail"] and entry["detail"].endswith(
        "without the new bundle: vm-2"
    )


async def test_a_dataplane_that_joins_while_distributing_gets_an_old_ca_certificate(
    central: Central,
) -> None:
    await joined_pair(central)
    started = await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    token = await central.join_token("shop", "web")
    answer = await join(central, token, agent("vm-3", address="10.0.0.3"))
    assert issuer_of(answer["certificates"]["web"], answer["ca_bundle"]) == (
        started["previous_ca_fingerprint"]
    )
    # It is online and has applied nothing yet: it holds the switch up too.
    status = await central.call("GET", "/v1/meshes/shop/ca-rotation")
    assert status["waiting_for_bundle"] == ["vm-1", "vm-2", "vm-3"]


async def test_the_switch_is_conditional_on_the_record_it_read(central: Central) -> None:
    one, two, _ = await joined_pair(central)
    await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    await apply_bundle(central, one, "vm-1")
    await apply_bundle(central, two, "vm-2")
    read = await central.store.get_mesh("shop")
    job = CaRotationSwitch(central.store, timeout_seconds=TIMEOUT)
    other = CaRotationSwitch(central.store, timeout_seconds=TIMEOUT)  # another replica
    assert await job.switch_one(read, central.clock()) is True
    assert await other.switch_one(read, central.clock()) is False  # stale: writes nothing
    entries = (await central.call("GET", "/v1/meshes/shop/audit"))["entries"]
    assert [e["action"] for e in entries].count("mesh.ca_rotation.switch") == 1


async def test_the_job_records_the_bundle_revision_when_the_start_did_not(
    central: Central,
) -> None:
    one, two, _ = await joined_pair(central)
    await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    # As if the process had stopped between storing the rotation and recording its
    # revision.
    record = await central.store.get_mesh("shop")
    unrecorded = msgspec.structs.replace(decode_spec(record), bundle_revision=0)
    await central.store.update_mesh(
        msgspec.structs.replace(record, spec=encode_spec(unrecorded)),
        expected_version=record.version,
    )
    status = await central.call("GET", "/v1/meshes/shop/ca-rotation")
    assert status["bundle_revision"] == 0 and status["waiting_for_bundle"] == ["vm-1", "vm-2"]
    assert await switch(central) == 0  # records the revision: nobody has applied it
    status = await central.call("GET", "/v1/meshes/shop/ca-rotation")
    recorded = status["bundle_revision"]
    assert recorded == await central.store.mesh_revision("shop") - 1
    await heartbeat(central, one, "vm-1", applied_version=recorded)
    await heartbeat(central, two, "vm-2", applied_version=recorded - 1)
    assert await switch(central) == 0
    await heartbeat(central, two, "vm-2", applied_version=recorded)
    assert await switch(central) == 1


async def test_offline_dataplanes_do_not_hold_up_the_finish_and_force_skips_the_rest(
    central: Central,
) -> None:
    one, _, _ = await joined_pair(central)
    await central.call("POST", "/v1/meshes/shop/ca-rotation", json={}, status=201)
    central.clock.now += 25.0
    await apply_bundle(central, one, "vm-1")  # vm-1 online; vm-2 silent
    central.clock.now += 10.0  # vm-2 past the 30 s online window
    assert await switch(central) == 1
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
