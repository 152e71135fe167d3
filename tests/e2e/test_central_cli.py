"""``meshagent central`` as a real process on a free loopback port, driven by the CLI as
an operator would: subprocesses pointed at it through MESHAGENT_* environment variables."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshagent.demo.ports import free_port
from meshagent.demo.processes import Process

SHOP_POLICIES = Path(__file__).parents[2] / "examples" / "policies" / "shop.toml"
TOKEN = re.compile(r"ma1_[0-9a-f]+_[A-Za-z0-9_-]+")


class Central:
    """One central agent process and the environment the CLI needs to reach it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.data = tmp / "data"
        self.config = tmp / "central.toml"
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\ndata_dir = "{self.data}"\n'
            '[log]\nlevel = "debug"\n'
        )
        self.process: Process | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.process = Process(
            [sys.executable, "-m", "meshagent", "central", "--config", str(self.config)],
            self.tmp / f"central-{self.starts}.log",
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise AssertionError(f"central exited: {self.process.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise AssertionError(f"central did not listen within 20 s: {self.process.output()}")

    def stop(self) -> int:
        assert self.process is not None
        return self.process.stop(signal.SIGTERM)

    def env(self, token_file: Path | None = None) -> dict[str, str]:
        return {
            "MESHAGENT_CENTRAL": f"https://127.0.0.1:{self.port}",
            "MESHAGENT_CENTRAL_CA": str(self.data / "central-ca.pem"),
            "MESHAGENT_TOKEN_FILE": str(token_file or self.data / "admin.token"),
        }

    def cli(
        self, *args: str, token_file: Path | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "meshagent", *args],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "HOME": str(self.tmp), **self.env(token_file)},
        )
        if ok:
            assert done.returncode == 0, (args, done.stderr)
        return done

    def json(self, *args: str, token_file: Path | None = None) -> object:
        return json.loads(self.cli(*args, "-o", "json", token_file=token_file).stdout)


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    server = Central(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.process.stop(signal.SIGKILL if server.process.proc.poll() is None else 0)


def one_line_error(done: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def policy_names(central: Central, mesh: str, token_file: Path | None = None) -> set[str]:
    policies = central.json("get", "policies", "--mesh", mesh, token_file=token_file)
    assert isinstance(policies, list)
    return {f"{p['kind']}/{p['name']}" for p in policies}


def test_operator_walkthrough_and_restart(central: Central) -> None:
    assert central.process is not None
    # The port listens a moment before the startup line is printed (after the leader
    # election started): wait for the line, a few seconds at most.
    deadline = time.monotonic() + 10
    while True:
        output = central.process.output()
        startup = [line for line in output.splitlines() if not line.startswith(("ts=", "["))]
        if startup or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(startup) == 1, output
    assert str(central.data / "admin.token") in startup[0]
    assert str(central.data / "central-ca.pem") in startup[0]
    assert (central.data / "admin.token").stat().st_mode & 0o777 == 0o600
    assert (central.data / "central-ca-key.pem").stat().st_mode & 0o777 == 0o600
    assert central.data.stat().st_mode & 0o777 == 0o700

    assert "created mesh shop" in central.cli("mesh", "create", "shop").stdout
    token = central.cli("token", "create", "--mesh", "shop", "--service", "orders").stdout
    assert TOKEN.fullmatch(token.strip()) and token.count("\n") == 1

    applied = central.cli("apply", "-f", str(SHOP_POLICIES)).stdout
    assert "shop: TrafficRoute/orders-migration created" in applied
    assert policy_names(central, "shop") == {
        "TrafficRoute/orders-migration", "TrafficPermission/callers-of-orders",
        "Timeout/orders-timeouts", "Retry/orders-retries",
    }
    assert "unchanged" in central.cli("apply", "-f", str(SHOP_POLICIES)).stdout
    central.cli("delete", "policy", "orders-retries", "--mesh", "shop", "--kind", "Retry")
    assert "Retry/orders-retries" not in policy_names(central, "shop")
    central.cli("mesh", "set-mtls", "shop", "permissive")
    table = central.cli("get", "meshes").stdout
    assert "shop" in table and "permissive" in table

    # Tokens: listed without secrets, revoked at once; every change is in the audit trail.
    listed = central.json("get", "tokens", "--mesh", "shop")
    assert isinstance(listed, list) and len(listed) == 1
    token_id = token.split("_")[1]
    assert listed[0]["id"] == token_id and token.strip() not in json.dumps(listed)
    assert token_id in central.cli("get", "tokens", "--mesh", "shop").stdout
    revoked = central.cli("delete", "token", token_id, "--mesh", "shop").stdout
    assert revoked == f"shop: token {token_id} revoked\n"
    assert central.json("get", "tokens", "--mesh", "shop") == []
    one_line_error(central.cli("delete", "token", token_id, "--mesh", "shop", ok=False),
                   f"token {token_id} not found in mesh shop")
    audit = central.cli("get", "audit", "--mesh", "shop", "--limit", "3").stdout.splitlines()
    assert audit[0].split()[:3] == ["TIME", "ACTOR", "ACTION"] and len(audit) == 4
    assert "token.revoke" in audit[1] and "mesh.update" in audit[2]

    assert central.stop() == 0
    admin_before = (central.data / "admin.token").read_text()
    ca_before = (central.data / "central-ca.pem").read_bytes()
    central.start()
    assert (central.data / "admin.token").read_text() == admin_before
    assert (central.data / "central-ca.pem").read_bytes() == ca_before
    meshes = central.json("get", "meshes")
    assert isinstance(meshes, list)
    assert [(m["name"], m["mtls"]) for m in meshes] == [("shop", "permissive")]
    assert len(policy_names(central, "shop")) == 3
    assert central.stop() == 0


def test_tenants_are_isolated(central: Central, tmp_path: Path) -> None:
    central.cli("mesh", "create", "shop")
    central.cli("mesh", "create", "bank", "--mtls", "permissive")
    tokens = {}
    for mesh in ("shop", "bank"):
        token = central.cli("token", "create", "--admin", "--mesh", mesh).stdout.strip()
        assert TOKEN.fullmatch(token)
        tokens[mesh] = tmp_path / f"{mesh}.token"
        tokens[mesh].write_text(token + "\n")

    meshes = central.json("get", "meshes", token_file=tokens["shop"])
    assert isinstance(meshes, list) and [m["name"] for m in meshes] == ["shop"]
    central.cli("apply", "-f", str(SHOP_POLICIES), token_file=tokens["shop"])
    assert len(policy_names(central, "shop", tokens["shop"])) == 4

    # The bank's admin sees neither the shop mesh nor its policies, and cannot write there.
    one_line_error(
        central.cli("get", "policies", "--mesh", "shop", token_file=tokens["bank"], ok=False),
        "mesh shop not found",
    )
    one_line_error(
        central.cli("apply", "-f", str(SHOP_POLICIES), token_file=tokens["bank"], ok=False),
        "mesh shop not found",
    )
    one_line_error(
        central.cli("mesh", "create", "evil", token_file=tokens["bank"], ok=False),
        "global admin",
    )
    bank_doc = tmp_path / "bank.toml"
    bank_doc.write_text(
        '[[TrafficPermission]]\nname = "tellers"\nsources = ["teller"]\ndestination = "ledger"\n'
    )
    central.cli("apply", "-f", str(bank_doc), "--mesh", "bank", token_file=tokens["bank"])
    assert policy_names(central, "bank", tokens["bank"]) == {"TrafficPermission/tellers"}
    assert len(policy_names(central, "shop")) == 4  # untouched


def test_cli_errors_are_one_line(central: Central, tmp_path: Path) -> None:
    central.cli("mesh", "create", "shop")
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[[TrafficRoute]]\nname = "r"\nmesh = "shop"\ndestination = "web"\n'
        '[[TrafficRoute.rule]]\nsplit = [{ service = "a", weight = -1 }]\n'
        '[[Timeout]]\nname = "t"\nmesh = "shop"\ndestination = "web"\nconnect = "soon"\n'
    )
    done = central.cli("apply", "-f", str(bad), ok=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    problems = done.stderr.strip().splitlines()
    assert len(problems) == 3, done.stderr  # every problem, each naming file, resource, field
    assert all(p.startswith(f"error: {bad}: ") for p in problems)
    assert 'TrafficRoute "r": rule[0].split[0].weight' in problems[0]
    assert 'Timeout "t": connect' in problems[2]
    assert policy_names(central, "shop") == set()

    one_line_error(central.cli("mesh", "create", "shop", ok=False), "already exists")
    one_line_error(central.cli("mesh", "set-mtls", "shop", "sometimes", ok=False), "mtls")
    one_line_error(central.cli("token", "create", "--mesh", "shop", ok=False), "--service")
    one_line_error(
        central.cli("get", "meshes", "--token-file", str(bad), ok=False), "not a meshagent token"
    )
    # Without the central CA the server is not trusted.
    done = subprocess.run(
        [sys.executable, "-m", "meshagent", "get", "meshes"],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "HOME": str(tmp_path), **central.env(), "MESHAGENT_CENTRAL_CA": ""},
    )
    one_line_error(done, "--central-ca")
    # Nothing listens there.
    done = subprocess.run(
        [sys.executable, "-m", "meshagent", "get", "meshes", "--central",
         f"https://127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=30, check=False,
        env={**os.environ, "HOME": str(tmp_path), **central.env()},
    )
    one_line_error(done, "cannot reach the central agent")


def test_cli_reads_its_config_file(central: Central, tmp_path: Path) -> None:
    config_dir = tmp_path / ".config" / "meshagent"
    config_dir.mkdir(parents=True)
    env = central.env()
    (config_dir / "cli.toml").write_text(
        f'central = "{env["MESHAGENT_CENTRAL"]}"\ncentral_ca = "{env["MESHAGENT_CENTRAL_CA"]}"\n'
        f'token_file = "{env["MESHAGENT_TOKEN_FILE"]}"\n'
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHAGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "meshagent", "mesh", "create", "shop"],
        capture_output=True, text=True, timeout=30, check=False,
        env={**clean, "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr


def test_central_config_errors(tmp_path: Path) -> None:
    config = tmp_path / "central.toml"
    config.write_text('listen = "127.0.0.1:5681"\n')
    done = subprocess.run(
        [sys.executable, "-m", "meshagent", "central", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    one_line_error(done, str(config), "data_dir")
    config.write_text(f'listen = "nowhere"\ndata_dir = "{tmp_path}/d"\n')
    done = subprocess.run(
        [sys.executable, "-m", "meshagent", "central", "--config", str(config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    one_line_error(done, "listen")


def test_port_in_use_is_one_line(central: Central, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(f'listen = "127.0.0.1:{central.port}"\ndata_dir = "{tmp_path}/other"\n')
    done = subprocess.run(
        [sys.executable, "-m", "meshagent", "central", "--config", str(other)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"127.0.0.1:{central.port}" in errors[0], done.stderr
