"""meshagent status and meshagent doctor against real agents, a real Consul and a real
central agent, on loopback."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from meshagent.agent.registration import service_id
from meshagent.config.agent import load_agent_config
from meshagent.demo.central import CentralProcess
from meshagent.demo.consul import ConsulProcess
from meshagent.demo.processes import render_agent_toml
from tests.e2e.harness import (
    agent_config,
    consul_get,
    eventually,
    free_port,
    running,
    start_agent,
    start_app,
)
from tests.support.pki import MeshCa, make_ca


def meshagent(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshagent", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


@pytest.fixture
def ca(tmp_path: Path) -> MeshCa:
    return make_ca(tmp_path / "ca", "shop")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for unix sockets (at most 107 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="ma-"))
    try:
        yield directory
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


@contextmanager
def listening(host: str = "127.0.0.1") -> Iterator[int]:
    """A socket listening on a free port of ``host`` (an app, for doctor's connect)."""
    with socket.socket() as app:
        app.bind((host, 0))
        app.listen(1)
        yield app.getsockname()[1]


def web_config(ca: MeshCa, app_port: int, orders_port: int, **extra: Any) -> dict[str, Any]:
    """An agent fronting "web" (registered in Consul when given) that calls "orders" at
    two fixed endpoints tagged v1 and v2."""
    config = agent_config(
        "web-1", "127.0.0.2", ca, "web",
        consul=extra.pop("consul", None),
        inbound={"port": free_port("127.0.0.2"), "app_port": app_port},
        outbound=[{"service": "orders", "port": orders_port, "endpoints": [
            {"address": "127.0.0.3:15443", "tags": {"version": "v1"}},
            {"address": "127.0.0.4:15443", "tags": {"version": "v2"}},
        ]}],
    )
    return {**config, **extra}


def test_status_and_doctor_on_a_running_agent(tmp_path: Path, ca: MeshCa, consul: ConsulProcess) -> None:
    app, app_port = start_app("echo", tmp_path, name="web")
    orders_port = free_port()
    config = web_config(ca, app_port, orders_port, consul=consul)
    with running(app):
        agent = start_agent(config, tmp_path, "web")
        with running(agent):
            loaded = load_agent_config(agent.config_path)
            sid = service_id(loaded, loaded.inbound[0])
            eventually(
                lambda: any(c["ServiceID"] == sid and c["Status"] == "passing"
                            for c in consul_get(consul, "/v1/health/checks/web")),
                within=15, what="the inbound's check passes in Consul",
            )
            shown = meshagent("status", "--config", str(agent.config_path))
            assert shown.returncode == 0, shown.stderr
            text = shown.stdout
            assert "agent web-1 (mesh shop): ready, snapshot version" in text
            assert f"127.0.0.2:{loaded.inbound[0].port}" in text and f"127.0.0.1:{app_port}" in text
            assert "passing" in text
            assert f"127.0.0.1:{orders_port}" in text
            assert "127.0.0.3:15443" in text and "version=v2" in text
            assert "left)" in text  # the certificate's expiry
            workers = loaded.worker_count(len(os.sched_getaffinity(0)))
            assert f"processes serving the listeners: {workers}\n" in text

            raw = meshagent("status", "--config", str(agent.config_path), "-o", "json")
            data = json.loads(raw.stdout)
            assert data["ready"] is True and data["snapshot"]["mesh"] == "shop"
            assert data["consul"] == {sid: "passing"}
            assert set(data["certificates"]) == {"web"}
            assert data["processes"] == {"serving": workers, "worker_restarts": 0}
            assert isinstance(data["stats"], dict)  # counters appear with a listener's first connection

            checked = meshagent("doctor", "--config", str(agent.config_path))
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert "held by the running agent" in checked.stdout
            assert "answers without an ACL token" in checked.stdout
            assert "FAIL" not in checked.stdout


def test_status_over_a_unix_admin_socket(tmp_path: Path, ca: MeshCa, short_dir: Path) -> None:
    socket_path = short_dir / "admin.sock"
    config = web_config(ca, free_port(), free_port(), admin=f"unix:{socket_path}")
    agent = start_agent(config, tmp_path, "web")
    with running(agent):
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660
        shown = meshagent("status", "--config", str(agent.config_path), "-o", "json")
        assert shown.returncode == 0, shown.stderr
        data = json.loads(shown.stdout)
        assert data["admin"] == f"unix:{socket_path}" and data["ready"] is True
        assert data["consul"] is None
        checked = meshagent("doctor", "--config", str(agent.config_path))
        assert f"ok    port         unix:{socket_path} answers" in checked.stdout
    assert agent.proc.returncode == 0
    assert not socket_path.exists()  # removed on the way out
    error = one_line_error(meshagent("status", "--config", str(agent.config_path)))
    assert f"admin unix:{socket_path}: no such file or directory" in error
    assert "is the agent running? systemctl status meshagent" in error


def test_status_errors_are_one_line(tmp_path: Path, ca: MeshCa) -> None:
    error = one_line_error(meshagent("status", "--config", str(tmp_path / "missing.toml")))
    assert "missing.toml: no such file" in error
    path = tmp_path / "agent.toml"
    path.write_text(render_agent_toml(web_config(ca, free_port(), free_port())))
    error = one_line_error(meshagent("status", "--config", str(path)))
    assert "connection refused — is the agent running?" in error and str(path) in error
    path.write_text(render_agent_toml(web_config(ca, free_port(), free_port(), admin="")))
    assert 'admin is "" (off)' in one_line_error(meshagent("status", "--config", str(path)))
    error = one_line_error(meshagent("status", "--config", str(path), "-o", "yaml"))
    assert '--output: "yaml" is not one of: table, json' in error


def test_doctor_passes_a_good_config(tmp_path: Path, ca: MeshCa) -> None:
    path = tmp_path / "agent.toml"
    with listening() as app_port:
        path.write_text(render_agent_toml(web_config(ca, app_port, free_port())))
        checked = meshagent("doctor", "--config", str(path))
    assert checked.returncode == 0, checked.stdout
    assert checked.stdout.strip().endswith("no problems found")
    assert f"app          127.0.0.1:{app_port} (inbound[0], web) accepts connections" in checked.stdout
    assert "web: spiffe://shop/service/web, valid until" in checked.stdout
    assert "1 key and token files are private (0600)" in checked.stdout
    assert "l4 pump      native: L4 connections are pumped in C" in checked.stdout


def test_doctor_names_each_problem_and_its_fix(tmp_path: Path, ca: MeshCa) -> None:
    """Unreachable Consul, a key readable by others, a port held by another process, an
    app that is not running."""
    orders_port, app_port = free_port(), free_port()
    config = web_config(ca, app_port, orders_port)
    config["consul"] = {"address": f"http://127.0.0.1:{free_port()}"}
    path = tmp_path / "agent.toml"
    path.write_text(render_agent_toml(config))
    os.chmod(config["tls"]["key"], 0o644)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", orders_port))
        squatter.listen(1)
        checked = meshagent("doctor", "--config", str(path))
    assert checked.returncode == 1
    failures = [line for line in checked.stdout.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 4, checked.stdout
    assert all(" — fix: " in line for line in failures), failures
    assert any("consul" in line and "unreachable (connection refused)" in line for line in failures)
    assert any(f"chmod 600 {config['tls']['key']}" in line for line in failures)
    assert any(f"127.0.0.1:{orders_port} (outbound[0].port) is in use by another process" in line
               for line in failures)
    assert (f"FAIL  app          127.0.0.1:{app_port} (inbound[0], web): connection refused — "
            "fix: start the app, or fix app_port") in failures
    assert checked.stderr.strip() == "4 problems found"


def test_doctor_finds_an_app_on_another_address_and_an_app_host_off_this_host(
    tmp_path: Path, ca: MeshCa
) -> None:
    """An app listening on the host's own address only, with no app_host: doctor names
    the address to set. An app_host that is not this host's: plaintext would leave it."""
    path = tmp_path / "agent.toml"
    with listening("127.0.0.5") as app_port:
        config = web_config(ca, app_port, free_port())
        path.write_text(render_agent_toml(config))
        checked = meshagent("doctor", "--config", str(path))
        assert checked.returncode == 1
        assert (f"FAIL  app          127.0.0.1:{app_port} (inbound[0], web): connection refused"
                f' — fix: the app listens on 127.0.0.5:{app_port}: set app_host = "127.0.0.5"'
                ) in checked.stdout.splitlines()

        config["inbound"][0]["app_host"] = "127.0.0.5"
        path.write_text(render_agent_toml(config))
        checked = meshagent("doctor", "--config", str(path))
        assert checked.returncode == 0, checked.stdout
        assert f"127.0.0.5:{app_port} (inbound[0], web) accepts connections" in checked.stdout

    config["inbound"][0]["app_host"] = "192.0.2.1"  # TEST-NET-1: no host has it
    path.write_text(render_agent_toml(config))
    checked = meshagent("doctor", "--config", str(path))
    assert checked.returncode == 1
    [line] = [x for x in checked.stdout.splitlines() if x.startswith("FAIL")]
    assert line.startswith(f"FAIL  app          192.0.2.1:{app_port} (inbound[0], web): 192.0.2.1 "
                           "is not an address of this host, and the agent's connection to its "
                           "app is plaintext — fix: ")


def test_doctor_checks_the_central_agent_and_the_clock(tmp_path: Path, ca: MeshCa) -> None:
    central = CentralProcess(tmp_path)
    central.start()
    try:
        token = tmp_path / "join.token"
        token.write_text("ma1_x_y\n")
        token.chmod(0o600)
        config: dict[str, Any] = {
            "mesh": "shop", "node": "web-1", "address": "127.0.0.2",
            "state_dir": str(tmp_path / "state"), "admin": "",
            "central": {"url": central.url, "ca": str(central.ca), "token_file": str(token)},
            "inbound": [{"service": "web", "port": free_port("127.0.0.2"), "app_port": 0}],
        }
        path = tmp_path / "agent.toml"
        with listening() as app_port:
            config["inbound"][0]["app_port"] = app_port
            path.write_text(render_agent_toml(config))
            checked = meshagent("doctor", "--config", str(path))
            assert checked.returncode == 0, checked.stdout
            assert f"{central.url} answers over TLS" in checked.stdout
            assert "ok    clock        within" in checked.stdout
            assert "web: not joined yet" in checked.stdout

            config["central"]["ca"] = str(ca.ca_path)  # another CA: the TLS check must fail
            path.write_text(render_agent_toml(config))
            checked = meshagent("doctor", "--config", str(path))
        assert checked.returncode == 1
        (line,) = [x for x in checked.stdout.splitlines() if x.startswith("FAIL")]
        assert "TLS failed (certificate verify failed: unable to get local issuer certificate)" in line
        assert "— fix: central.ca must be that central agent's central-ca.pem" in line
    finally:
        central.stop()
