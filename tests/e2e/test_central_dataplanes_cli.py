"""``meshagent get dataplanes`` and ``meshagent delete dataplane`` against a real central
agent process, with dataplanes that joined through its HTTPS API (real CSRs)."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from meshagent.demo.central import CentralProcess
from meshagent.pki.csr import make_csr
from meshagent.snapshot.wire import InboundSpec, JoinRequest, OutboundSpec


@pytest.fixture
def central(tmp_path: Path) -> Iterator[CentralProcess]:
    process = CentralProcess(tmp_path)
    process.start()
    try:
        yield process
    finally:
        process.stop()


def cli(central: CentralProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HOME": str(central.directory),
        "MESHAGENT_CENTRAL": central.url,
        "MESHAGENT_CENTRAL_CA": str(central.ca),
        "MESHAGENT_TOKEN_FILE": str(central.data / "admin.token"),
    }
    return subprocess.run(
        [sys.executable, "-m", "meshagent", *args],
        capture_output=True, text=True, timeout=30, check=False, env=env,
    )


def http_client(central: CentralProcess) -> httpx.Client:
    tls = ssl.create_default_context(cafile=str(central.ca))
    return httpx.Client(base_url=central.url, verify=tls, timeout=10, trust_env=False)


def join(central: CentralProcess, token: str, request: JoinRequest) -> dict[str, Any]:
    with http_client(central) as http:
        response = http.post(
            "/v1/join", headers={"Authorization": f"Bearer {token}"},
            content=msgspec.json.encode(request),
        )
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def join_request(name: str, address: str, inbound: str, outbound: str | None = None) -> JoinRequest:
    outbounds = [OutboundSpec(service=outbound, port=16001, source=inbound)] if outbound else []
    return JoinRequest(
        mesh="shop", dataplane=name, node=f"host-{name}", address=address,
        inbounds=[InboundSpec(service=inbound, port=15443)], outbounds=outbounds,
        csrs={inbound: make_csr("shop", inbound)[0].decode()},
    )


def report(central: CentralProcess, node_token: str, name: str, body: dict[str, Any]) -> None:
    with http_client(central) as http:
        response = http.put(
            f"/v1/dataplanes/shop/{name}/status",
            headers={"Authorization": f"Bearer {node_token}"}, json=body,
        )
    assert response.status_code == 204, response.text


def test_get_and_delete_dataplanes(central: CentralProcess) -> None:
    assert cli(central, "mesh", "create", "shop").returncode == 0
    with central.admin() as admin:
        token = admin.join_token("shop", ["web", "orders"], uses=2)
    web = join(central, token, join_request("web-1", "127.0.0.2", "web", outbound="orders"))
    join(central, token, join_request("orders-1", "127.0.0.3", "orders"))

    listed = json.loads(cli(central, "get", "dataplanes", "--mesh", "shop", "-o", "json").stdout)
    by_name = {d["name"]: d for d in listed}
    assert sorted(by_name) == ["orders-1", "web-1"]
    latest = by_name["web-1"]["latest_version"]
    report(central, web["node_token"], "web-1", {"applied_version": latest})
    report(central, web["node_token"], "web-1",
           {"applied_version": latest, "state": "rejected", "error": "port 16001 in use"})

    done = cli(central, "get", "dataplanes", "--mesh", "shop")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == [
        "NAME", "NODE", "ADDRESS", "SERVICES", "STATUS", "APPLIED/LATEST", "CERT-EXPIRES", "CA"
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert rows["orders-1"][1:5] == ["host-orders-1", "127.0.0.3", "orders", "online"]
    assert rows["orders-1"][5] == f"0/{latest}"
    assert rows["web-1"][1:6] == ["host-web-1", "127.0.0.2", "web", "online,", "rejected"]
    assert rows["web-1"][6] == f"{latest}/{latest}"
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\dZ", rows["web-1"][7])
    assert rows["web-1"][8] == "current"  # signed by the mesh's CA at the join
    assert lines[3] == "web-1: config rejected: port 16001 in use"

    done = cli(central, "delete", "dataplane", "orders-1", "--mesh", "shop")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "shop: dataplane orders-1 deleted, with its node credential"
    listed = json.loads(cli(central, "get", "dataplanes", "--mesh", "shop", "-o", "json").stdout)
    assert [d["name"] for d in listed] == ["web-1"]

    for args, error in [
        (("delete", "dataplane", "orders-1", "--mesh", "shop"),
         "error: dataplane orders-1 in mesh shop not found"),
        (("get", "dataplanes", "--mesh", "nope"), "error: mesh nope not found"),
    ]:
        done = cli(central, *args)
        assert done.returncode == 1 and done.stderr.strip() == error, done.stderr


def test_strict_meshes_deny_by_default(central: CentralProcess) -> None:
    done = cli(central, "mesh", "create", "bank", "--default-deny")
    assert done.stdout.strip() == "created mesh bank (mtls strict, default deny, builtin CA)"
    table = cli(central, "get", "meshes").stdout.splitlines()
    assert table[0].split() == ["NAME", "MTLS", "DEFAULT", "CA", "VERSION"]
    assert table[1].split() == ["bank", "strict", "deny", "builtin", "1"]
    done = cli(central, "mesh", "set", "bank", "--mtls", "permissive", "--default-allow")
    assert done.stdout.strip() == "mesh bank: mtls permissive, default allow"
    done = cli(central, "mesh", "set", "bank")
    assert done.returncode == 1 and done.stderr.strip().startswith("error: nothing to change")
    meshes = json.loads(cli(central, "get", "meshes", "-o", "json").stdout)
    assert [(m["mtls"], m["default_allow"]) for m in meshes] == [("permissive", True)]
