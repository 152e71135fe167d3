"""A mesh CA rotated under traffic: real central and agent processes on loopback, real
TLS, the operator's CLI.

Two agents (web -> orders) carry steady traffic over one held connection and over new
connections while the operator runs ``meshagent mesh rotate-ca``: the new CA is
distributed first, and the central agent switches the signer only once both agents have
applied a config carrying it (a watcher reads the phase, then the dataplanes, every
0.1 s); then both agents move to certificates of the new CA within a bounded time, no
exchange fails and no handshake is refused for an unknown CA, the held connection
survives, ``--finish`` is refused while an online dataplane still has an old-CA
certificate, then done; traffic still flows, and a certificate of
the old CA is refused by the inbound."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from meshagent.demo.central import CentralProcess
from meshagent.pki.csr import make_csr
from meshagent.snapshot.wire import JoinRequest, OutboundSpec
from tests.e2e.harness import eventually
from tests.e2e.test_central_mesh import Mesh, round_trip

SPREAD_SECONDS = 3.0
# Agents see the rotation at once (long poll), renew within the spread and report
# within a heartbeat (1 s); the rest is slack for a loaded machine.
MOVE_WITHIN_SECONDS = SPREAD_SECONDS + 12.0



def _certificates_in(bundle: Path, count: int) -> bool:
    return bundle.read_text().count("BEGIN CERTIFICATE") == count


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


@dataclass
class Traffic:
    """Steady traffic from a thread: one held connection and a new one each round."""

    port: int
    failures: list[str] = field(default_factory=list)
    rounds: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as held:
                while not self.stop.is_set():
                    payload = f"ping {self.rounds}\n".encode()
                    held.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        chunk = held.recv(100)
                        if not chunk:
                            break
                        got += chunk
                    if got != payload:
                        self.failures.append(f"held connection, round {self.rounds}: {got!r}")
                        return
                    if not round_trip(self.port, payload):
                        self.failures.append(f"new connection, round {self.rounds}")
                    self.rounds += 1
                    time.sleep(0.05)
        except OSError as exc:
            self.failures.append(f"held connection, round {self.rounds}: {exc}")


def stuck_dataplane(central: CentralProcess, token: str) -> tuple[str, ssl.SSLContext]:
    """A dataplane that joined (certificate of the current CA) and never renews: what
    an agent cut off from the central agent's long poll would look like."""
    csr, _ = make_csr("shop", "web")
    request = JoinRequest(
        mesh="shop", dataplane="vm-stuck", node="vm-stuck", address="127.0.0.9",
        outbounds=[OutboundSpec(service="orders", port=16001, source="web")],
        csrs={"web": csr.decode()},
    )
    tls = ssl.create_default_context(cafile=str(central.ca))
    with httpx.Client(base_url=central.url, verify=tls, timeout=10, trust_env=False) as http:
        answer = http.post(
            "/v1/join", headers={"Authorization": f"Bearer {token}"},
            content=msgspec.json.encode(request),
        )
    assert answer.status_code == 201, answer.text
    return answer.json()["node_token"], tls


def heartbeat(central: CentralProcess, node_token: str, tls: ssl.SSLContext) -> None:
    with httpx.Client(base_url=central.url, verify=tls, timeout=10, trust_env=False) as http:
        response = http.put(
            "/v1/dataplanes/shop/vm-stuck/status",
            headers={"Authorization": f"Bearer {node_token}"},
            json={"applied_version": 1},
        )
    assert response.status_code == 204, response.text


@dataclass
class PhaseWatch:
    """Reads the rotation's phase, then the dataplanes' applied versions, until
    stopped: ``violations`` lists every moment the new CA signed while an agent had not
    applied the new bundle."""

    central: CentralProcess
    agents: tuple[str, ...]
    bundle_revision: int = 0
    phases: list[str | None] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        tls = ssl.create_default_context(cafile=str(self.central.ca))
        token = (self.central.data / "admin.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(
            base_url=self.central.url, verify=tls, timeout=10, trust_env=False, headers=headers
        ) as http:
            while not self.stop.is_set():
                try:
                    rotation = http.get("/v1/meshes/shop/ca-rotation").json()
                    listed = http.get("/v1/meshes/shop/dataplanes").json()["dataplanes"]
                except (httpx.HTTPError, ValueError) as exc:
                    self.errors.append(str(exc))
                    continue
                phase = rotation["phase"]
                if phase == "distributing" and rotation["bundle_revision"]:
                    self.bundle_revision = rotation["bundle_revision"]
                if not self.phases or self.phases[-1] != phase:
                    self.phases.append(phase)
                if phase == "renewing":
                    applied = {d["name"]: d["applied_version"] for d in listed}
                    behind = [a for a in self.agents if applied[a] < self.bundle_revision]
                    if not self.bundle_revision or behind:
                        self.violations.append(
                            f"the new CA signs; bundle version {self.bundle_revision}, "
                            f"applied: {applied}"
                        )
                time.sleep(0.1)


def unknown_ca_refusals(admin_address: str) -> float:
    """The inbound's count of handshakes refused for a certificate of an unknown CA."""
    text = httpx.get(f"http://{admin_address}/metrics", timeout=5, trust_env=False).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("meshagent_tls_handshake_failures_total{")
        and 'reason="unknown-ca"' in line
    )


def handshake_alert(pem: Path, bundle: Path, port: int) -> str:
    """Connect to an inbound presenting the certificate and key in ``pem``; the TLS
    error the server's verdict produces ("" if none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cafile=str(bundle))
    context.load_cert_chain(str(pem))
    try:
        with (
            socket.create_connection(("127.0.0.3", port), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"x")
            tls.recv(1)  # TLS 1.3: the server's refusal arrives after the handshake
    except ssl.SSLError as exc:
        return str(exc)
    except OSError as exc:
        return f"os: {exc}"
    return ""


def test_ca_rotation_under_traffic(tmp_path: Path) -> None:
    central = CentralProcess(
        tmp_path, cert_ttl="1h", heartbeat_interval="1s",
        ca_rotation_spread=f"{SPREAD_SECONDS:g}s",
    )
    central.start()
    try:
        with central.admin() as admin, Mesh(central, tmp_path) as mesh:
            admin.create_mesh("shop", mtls="strict")
            echo_port = mesh.start_echo()
            orders_config = mesh.orders_config(admin, echo_port)
            orders = mesh.start(orders_config, "orders")
            web_config = mesh.web_config(admin)
            web = mesh.start(web_config, "web")
            eventually(lambda: round_trip(mesh.web_port), within=10, what="web -> orders")
            node_token, tls = stuck_dataplane(central, admin.join_token("shop", ["web"]))

            def on_current() -> dict[str, object]:
                return {d["name"]: d["on_current_ca"] for d in admin.dataplanes("shop")}

            eventually(
                lambda: on_current() == {"orders-shop": True, "web-shop": True, "vm-stuck": True},
                within=10, what="every dataplane reports the mesh CA",
            )
            # The stuck dataplane is offline when the rotation starts (it does not hold
            # up the switch): only the two agents do.
            def stuck_offline() -> bool:
                return not next(d for d in admin.dataplanes("shop") if d["name"] == "vm-stuck")[
                    "online"
                ]

            eventually(stuck_offline, within=10, what="vm-stuck offline")
            refusals_before = {
                name: unknown_ca_refusals(config["admin"])
                for name, config in (("orders", orders_config), ("web", web_config))
            }
            # Keep web's certificate of the old CA, and the old CA, for the end.
            web_state = Path(web_config["state_dir"]) / "central"
            old_pem = tmp_path / "old-web.pem"
            shutil.copy(web_state / "web.pem", old_pem)

            traffic = Traffic(mesh.web_port)
            thread = threading.Thread(target=traffic.run, daemon=True)
            thread.start()
            watch = PhaseWatch(central, ("orders-shop", "web-shop"))
            watcher = threading.Thread(target=watch.run, daemon=True)
            watcher.start()
            try:
                time.sleep(1.0)
                started = time.time()
                rotate = cli(central, "mesh", "rotate-ca", "shop")
                assert rotate.returncode == 0, rotate.stderr
                assert "CA rotation started: distributing" in rotate.stdout

                def switched() -> bool:
                    phase = admin.call("GET", "/v1/meshes/shop/ca-rotation")["phase"]
                    return bool(phase == "renewing")

                eventually(switched, within=MOVE_WITHIN_SECONDS, what="the new CA signs")
                rotation = admin.call("GET", "/v1/meshes/shop/ca-rotation")
                to_switch = rotation["switched_at"] - rotation["started_at"]

                def moved() -> bool:
                    state = on_current()
                    return state["orders-shop"] is True and state["web-shop"] is True

                eventually(moved, within=MOVE_WITHIN_SECONDS, what="both agents on the new CA")
                moved_at = time.time()
                print(
                    f"CLI to rotation stored {rotation['started_at'] - started:.1f} s; stored "
                    f"to switch {to_switch:.1f} s; switch to both agents on the new CA "
                    f"{moved_at - rotation['switched_at']:.1f} s; rotate-ca to all on it "
                    f"{moved_at - started:.1f} s"
                )
                assert on_current()["vm-stuck"] is False
                watch.stop.set()
                watcher.join(10)
                # The switch came after both agents applied the new bundle, not by timeout.
                assert watch.violations == [], watch.violations
                assert watch.phases[watch.phases.index("distributing"):][:2] == [
                    "distributing", "renewing"
                ], watch.phases
                switch = next(
                    e for e in admin.call("GET", "/v1/meshes/shop/audit")["entries"]
                    if e["action"] == "mesh.ca_rotation.switch"
                )
                assert switch["actor"] == "central"
                assert "every online dataplane has the new bundle" in switch["detail"]
                # Nobody was asked to trust a certificate of a CA it did not have.
                for name, config in (("orders", orders_config), ("web", web_config)):
                    assert unknown_ca_refusals(config["admin"]) == refusals_before[name], name

                listing = cli(central, "get", "dataplanes", "--mesh", "shop")
                assert listing.returncode == 0, listing.stderr
                lines = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
                assert lines["web-shop"].rstrip().endswith("current")
                assert lines["vm-stuck"].rstrip().endswith("previous")

                # An online dataplane still holds an old-CA certificate: refused.
                heartbeat(central, node_token, tls)
                refused = cli(central, "mesh", "rotate-ca", "shop", "--finish")
                assert refused.returncode == 1
                errors = refused.stderr.strip().splitlines()
                assert len(errors) == 1 and "vm-stuck" in errors[0], refused.stderr
                again = cli(central, "mesh", "rotate-ca", "shop")
                assert again.returncode == 1 and "already in progress" in again.stderr

                admin.call("DELETE", "/v1/meshes/shop/dataplanes/vm-stuck")
                finish = cli(central, "mesh", "rotate-ca", "shop", "--finish")
                assert finish.returncode == 0, finish.stderr
                # Both agents drop the old CA from their bundle (one certificate left).
                for config in (orders_config, web_config):
                    bundle = Path(config["state_dir"]) / "central" / "ca.pem"
                    eventually(
                        functools.partial(_certificates_in, bundle, 1),
                        within=10, what="the old CA leaves the trust bundle",
                    )
                rounds_at_finish = traffic.rounds
                time.sleep(2.0)
            finally:
                traffic.stop.set()
                watch.stop.set()
                thread.join(10)
                watcher.join(10)
            assert traffic.failures == [], traffic.failures
            assert traffic.rounds > rounds_at_finish + 5, "traffic stopped after the finish"
            assert round_trip(mesh.web_port), "new connections fail after the finish"
            for agent in (orders, web):
                assert "certificates are not from the mesh's signing CA" in agent.output()

            # A certificate of the old CA is now refused by the inbound, for its CA; the
            # current one is not (same client, same bundle).
            bundle = web_state / "ca.pem"
            before = unknown_ca_refusals(orders_config["admin"])
            assert handshake_alert(old_pem, bundle, mesh.orders_port) != ""
            eventually(
                lambda: unknown_ca_refusals(orders_config["admin"]) == before + 1,
                within=5, what="the inbound counts the old-CA certificate as unknown-ca",
            )
            handshake_alert(web_state / "web.pem", bundle, mesh.orders_port)
            time.sleep(0.5)
            assert unknown_ca_refusals(orders_config["admin"]) == before + 1
    finally:
        central.stop()
