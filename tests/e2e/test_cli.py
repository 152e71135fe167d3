"""The meshagent command as an operator meets it: exit codes and one-line errors."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshagent.demo.processes import render_agent_toml
from tests.e2e.harness import agent_config, free_port
from tests.support.pki import MeshCa, make_ca


def meshagent(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshagent", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.fixture
def ca(tmp_path: Path) -> MeshCa:
    return make_ca(tmp_path / "ca", "shop")


def write_config(tmp_path: Path, ca: MeshCa, **inbound: object) -> Path:
    config = agent_config(
        "orders", "127.0.0.3", ca, "orders", consul=None,
        inbound={"port": free_port("127.0.0.3"), "app_port": free_port(), **inbound},
    )
    path = tmp_path / "agent.toml"
    path.write_text(render_agent_toml(config))
    return path


def assert_one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert done.returncode == 1, done
    # Log lines (logfmt, "ts=...") may come before; the error itself is one line.
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("ts=")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_check_accepts_a_good_config(tmp_path: Path, ca: MeshCa) -> None:
    path = write_config(tmp_path, ca)
    done = meshagent("check", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path}: ok"


def test_check_prints_every_problem(tmp_path: Path, ca: MeshCa) -> None:
    path = write_config(tmp_path, ca)
    text = path.read_text().replace('mesh = "shop"', 'mesh = "Shop"').replace("app_port = ", "app_port = 7000000 #")
    path.write_text(text)
    done = meshagent("check", "--config", str(path))
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f"error: {path}: ") for line in lines)
    assert "mesh:" in lines[0] and "inbound[0].app_port" in lines[1]


def test_run_with_an_unknown_key_fails_with_one_line(tmp_path: Path, ca: MeshCa) -> None:
    path = write_config(tmp_path, ca)
    path.write_text(path.read_text().replace("[tls]", "[tls]\nciphers = \"all\""))
    assert_one_line_error(meshagent("run", "--config", str(path)), str(path), "tls", "ciphers")


def test_run_with_a_missing_certificate_names_the_file(tmp_path: Path, ca: MeshCa) -> None:
    path = write_config(tmp_path, ca)
    missing = tmp_path / "nowhere.pem"
    text = path.read_text().replace(str(ca.directory / "orders.pem"), str(missing))
    path.write_text(text)
    assert_one_line_error(meshagent("run", "--config", str(path)), str(missing))


def test_run_with_a_garbage_key_names_the_file(tmp_path: Path, ca: MeshCa) -> None:
    path = write_config(tmp_path, ca)
    key = ca.directory / "orders-key.pem"
    key.write_text("not a key\n")
    assert_one_line_error(meshagent("run", "--config", str(path)), str(key))


def test_run_when_the_port_is_taken_says_so(tmp_path: Path, ca: MeshCa) -> None:
    port = free_port("127.0.0.3")
    path = write_config(tmp_path, ca, port=port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.3", port))
        squatter.listen()
        done = meshagent("run", "--config", str(path))
    assert_one_line_error(done, f"cannot listen on 127.0.0.3:{port}", "address already in use")


def test_run_with_a_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert_one_line_error(meshagent("run", "--config", str(path)), f"{path}: no such file")


def test_help_has_examples() -> None:
    for command in (["run"], ["check"], ["pki", "init-ca"], ["pki", "issue"]):
        done = meshagent(*command, "--help")
        assert done.returncode == 0, done.stderr
        assert "Example" in done.stdout or "example" in done.stdout, command


def test_check_and_run_of_a_central_config_name_what_is_missing(tmp_path: Path) -> None:
    config = {
        "mesh": "shop", "node": "vm-1", "state_dir": str(tmp_path / "state"),
        "admin": "",
        "central": {"url": f"https://127.0.0.1:{free_port()}", "ca": str(tmp_path / "c.pem"),
                    "token_file": str(tmp_path / "join.token"), "join_timeout": "1s"},
        "inbound": [{"service": "orders", "port": free_port(), "app_port": free_port()}],
    }
    path = tmp_path / "agent.toml"
    path.write_text(render_agent_toml(config))
    done = meshagent("check", "--config", str(path))
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert any("central.ca" in e and "no such file" in e for e in errors), errors
    assert any("central.token_file" in e and "meshagent token create" in e for e in errors)
    # With the files present, the agent tries to join and gives up after join_timeout.
    ca_pem = str(make_ca(tmp_path / "ca", "shop").ca_path)
    config["central"]["ca"] = ca_pem  # type: ignore[index]
    path.write_text(render_agent_toml(config))
    (tmp_path / "join.token").write_text("ma1_abc_secret\n")
    assert meshagent("check", "--config", str(path)).returncode == 0
    assert_one_line_error(
        meshagent("run", "--config", str(path)), "cannot join mesh shop", "central.join_timeout"
    )
    assert "ma1_abc_secret" not in meshagent("run", "--config", str(path)).stderr
