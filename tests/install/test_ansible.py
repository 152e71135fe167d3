"""The ansible roles, applied for real with ``-c local`` into a temporary root prefix
(no Docker, no systemd as PID 1; services are not started), plus ansible-lint and
--syntax-check of the roles and the example playbook.

Runs as root or not: the tests never create users (``meshagent_manage_user: false``)
and make the current user and group the service's owner.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.install.units import ROOT, UNIT_DIR, verify
from tests.support.pki import make_ca

BIN = Path(sys.executable).parent
ROLES = ROOT / "ansible" / "roles"
EXAMPLE = ROOT / "examples" / "ansible"
SECRETS = ("ma1_joinsecret_do-not-log", "consul-secret-do-not-log", "store-secret-do-not-log")
RECAP = re.compile(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")

pytestmark = pytest.mark.skipif(
    not (BIN / "ansible-playbook").exists(),
    reason="ansible-core is not installed: pip install -e '.[test]'",
)


def ansible_env(home: Path) -> dict[str, str]:
    config = home / "ansible.cfg"  # empty: ignore any ansible.cfg around
    config.touch()
    return {
        **os.environ,
        "ANSIBLE_ROLES_PATH": str(ROLES),
        "ANSIBLE_HOME": str(home),
        "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_STDOUT_CALLBACK": "default",
        "ANSIBLE_CONFIG": str(config),
        "NO_COLOR": "1",
    }


@dataclass(frozen=True)
class Run:
    output: str
    changed: int
    failed: int


def playbook(home: Path, path: Path, *args: str, timeout: float = 300) -> Run:
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-c", "local", "-i", "localhost,", str(path), *args],
        capture_output=True, text=True, timeout=timeout, check=False, cwd=home,
        env=ansible_env(home),
    )
    output = result.stdout + result.stderr
    recap = RECAP.search(output)
    assert result.returncode == 0 and recap, output[-4000:]
    return Run(output, changed=int(recap[2]), failed=int(recap[4]))


def current_user_and_group() -> tuple[str, str]:
    return pwd.getpwuid(os.getuid()).pw_name, grp.getgrgid(os.getgid()).gr_name


def source_snapshot(directory: Path) -> Path:
    """A copy of the project's source: others may edit the checkout while a test runs,
    and a changed source is (rightly) a changed wheel."""
    directory.mkdir()
    shutil.copytree(ROOT / "meshagent", directory / "meshagent",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, directory / name)
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ansible_lint_passes_offline(tmp_path: Path) -> None:
    """The production profile, offline (no collection or schema downloads)."""
    result = subprocess.run(
        [str(BIN / "ansible-lint"), "-c", str(ROOT / "ansible" / ".ansible-lint"), "--nocolor",
         str(ROLES), str(EXAMPLE / "playbook.yml")],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
        env={**ansible_env(tmp_path), "XDG_CACHE_HOME": str(tmp_path)},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Profile 'production' was required, and it passed" in output


def test_example_playbook_syntax(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "--syntax-check", "-i", str(EXAMPLE / "inventory.ini"),
         str(EXAMPLE / "playbook.yml")],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
        env=ansible_env(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    inventory = subprocess.run(
        [str(BIN / "ansible-inventory"), "-i", str(EXAMPLE / "inventory.ini"), "--list"],
        capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path,
        env=ansible_env(tmp_path),
    )
    hosts = json.loads(inventory.stdout)["_meta"]["hostvars"]
    assert hosts["vm-12"]["meshagent_inbound"][0]["service"] == "monolith"
    assert hosts["central-1"]["meshagent_central_listen"] == "10.0.0.5:5681"


def test_units_from_the_role_templates_are_the_systemd_files(tmp_path: Path) -> None:
    """With the roles' defaults the templates render systemd/*.service byte for byte;
    a port below 1024 turns on CAP_NET_BIND_SERVICE, and that unit verifies too."""
    play = tmp_path / "render.yml"
    play.write_text(json.dumps([{
        "name": "Render the unit templates",
        "hosts": "all",
        "gather_facts": False,
        "vars_files": [str(ROLES / "meshagent_agent/defaults/main.yml"),
                       str(ROLES / "meshagent_central/defaults/main.yml")],
        "tasks": [
            {"name": "Agent unit", "ansible.builtin.template": {
                "src": str(ROLES / "meshagent_agent/templates/meshagent.service.j2"),
                "dest": str(tmp_path / "meshagent.service"), "mode": "0644"}},
            {"name": "Central unit", "ansible.builtin.template": {
                "src": str(ROLES / "meshagent_central/templates/meshagent-central.service.j2"),
                "dest": str(tmp_path / "meshagent-central.service"), "mode": "0644"},
             "vars": {"meshagent_central_listen": "10.0.0.5:5681"}},
            {"name": "Agent unit on a low port", "ansible.builtin.template": {
                "src": str(ROLES / "meshagent_agent/templates/meshagent.service.j2"),
                "dest": str(tmp_path / "low" / "meshagent.service"), "mode": "0644"},
             "vars": {"meshagent_inbound": [{"service": "web", "port": 443, "app_port": 8080}],
                      "meshagent_limits": {"drain_timeout": "2m"},
                      "meshagent_venv": str(BIN.parent)}},
        ],
    }]))
    (tmp_path / "low").mkdir()
    playbook(tmp_path, play, "-e", f"ansible_python_interpreter={sys.executable}")
    for name in ("meshagent.service", "meshagent-central.service"):
        assert (tmp_path / name).read_text() == (UNIT_DIR / name).read_text(), name
    low = (tmp_path / "low" / "meshagent.service").read_text()
    assert "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in low
    assert "\nAmbientCapabilities=CAP_NET_BIND_SERVICE\n" in low
    assert "\nTimeoutStopSec=135s\n" in low  # drain 2m + 15 s
    assert verify(tmp_path / "low" / "meshagent.service") == ""


def role_vars(work: Path, prefix: Path, source: Path) -> dict[str, Any]:
    user, group = current_user_and_group()
    ca = make_ca(work / "central-ca", "central")
    return {
        "ansible_python_interpreter": sys.executable,
        "meshagent_root_prefix": str(prefix),
        "meshagent_start_services": False,
        "meshagent_manage_user": False,
        "meshagent_install_python": False,
        "meshagent_user": user,
        "meshagent_group": group,
        "meshagent_python": getattr(sys, "_base_executable", sys.executable),
        "meshagent_package_source": str(source),
        "meshagent_controller_wheel_dir": str(work / "wheels"),
        # meshagent_central
        "meshagent_central_listen": "127.0.0.1:5681",
        "meshagent_central_cert_ttl": "12h",
        "meshagent_central_store": {"kind": "consul", "address": "http://127.0.0.1:8500"},
        "meshagent_central_store_token": SECRETS[2],
        # meshagent_agent
        "meshagent_mesh": "shop",
        "meshagent_node": "vm-12",
        "meshagent_address": "127.0.0.2",
        "meshagent_central": {"url": "https://127.0.0.1:5681", "join_timeout": "2m"},
        "meshagent_central_ca_pem": (ca.directory / "ca.pem").read_text(),
        "meshagent_join_token": SECRETS[0],
        "meshagent_consul": {"address": "http://127.0.0.1:8500", "watch_wait": "10s"},
        "meshagent_consul_token": SECRETS[1],
        "meshagent_inbound": [{
            "service": "monolith", "port": 15443, "app_port": 8080, "protocol": "http",
            "tags": {"version": "v1", "team": "shop floor"},
            "health": {"http": "/healthz", "interval": "5s"},
        }],
        "meshagent_outbound": [{"service": "orders", "port": 16001, "protocol": "http"}],
        "meshagent_limits": {"drain_timeout": "20s", "max_connections": 500},
        "meshagent_log": {"format": "json", "access": "off"},
    }


def write_play(path: Path, *roles: str) -> Path:
    path.write_text(json.dumps([{
        "name": "meshagent on one host",
        "hosts": "all",
        "gather_facts": False,
        "roles": [{"role": role} for role in roles],
    }]))
    return path


def write_vars(path: Path, variables: dict[str, Any]) -> tuple[str, str]:
    path.write_text(json.dumps(variables))
    return "-e", f"@{path}"


def check_installed_agent(prefix: Path) -> None:
    """The rendered agent.toml passes `meshagent check` of the installed meshagent; tokens
    are 0600; the unit passes systemd-analyze verify with the installed ExecStart."""
    etc, venv = prefix / "etc" / "meshagent", prefix / "opt" / "meshagent" / "venv"
    check = subprocess.run(
        [str(venv / "bin" / "meshagent"), "check", "--config", str(etc / "agent.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert check.returncode == 0, check.stderr
    # The wheel is pure Python; the role compiled the C pump for the host's Python.
    pump = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "from meshagent.dataplane.nativepump import native_problem; print(native_problem())"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert pump.stdout.strip() == "None", pump.stdout + pump.stderr
    agent_toml = (etc / "agent.toml").read_text()
    assert 'tags = { version = "v1", team = "shop floor" }' in agent_toml
    assert f'token_file = "{etc}/join.token"' in agent_toml
    for name in ("join.token", "consul.token"):
        assert mode(etc / name) == 0o600, name
    assert (etc / "join.token").read_text() == SECRETS[0] + "\n"
    assert mode(etc / "agent.toml") == 0o640
    assert mode(etc) == 0o750
    assert mode(prefix / "var" / "lib" / "meshagent") == 0o700
    unit = prefix / "etc" / "systemd" / "system" / "meshagent.service"
    assert f"ExecStart={venv}/bin/meshagent run --config {etc}/agent.toml\n" in unit.read_text()
    assert "\nTimeoutStopSec=35s\n" in unit.read_text()  # drain 20s + 15 s
    assert verify(unit) == ""


def test_agent_role_refuses_a_bad_config_then_installs_idempotently(tmp_path: Path) -> None:
    """The default-suite role test (about 35 s: one virtualenv install is the floor), from
    a pre-built wheel. A bad agent.toml is refused by meshagent check before it replaces
    the one in force (and before any unit is installed); the good one installs, a second
    run changes nothing, and uninstall leaves only the state directory."""
    prefix = tmp_path / "root"
    wheel = subprocess.run(
        [sys.executable, str(ROLES / "meshagent_common" / "files" / "build_wheel.py"),
         str(source_snapshot(tmp_path / "src")), str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout.strip()
    variables = role_vars(tmp_path, prefix, Path(wheel))
    play = write_play(tmp_path / "agent.yml", "meshagent_agent")

    in_force = prefix / "etc" / "meshagent" / "agent.toml"
    in_force.parent.mkdir(parents=True)
    in_force.write_text("# the config in force\n")
    bad = write_vars(tmp_path / "bad.json",
                     {**variables, "meshagent_outbound": [{"service": "Orders", "port": 16001}]})
    refused = subprocess.run(
        [str(BIN / "ansible-playbook"), "-c", "local", "-i", "localhost,", str(play), *bad],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
        env=ansible_env(tmp_path),
    )
    assert refused.returncode != 0
    assert "outbound[0].service: 'Orders' is not a valid name" in refused.stdout
    assert in_force.read_text() == "# the config in force\n"
    assert not (prefix / "etc" / "systemd" / "system" / "meshagent.service").exists()

    good = write_vars(tmp_path / "vars.json", variables)
    first = playbook(tmp_path, play, *good)
    assert first.changed > 0
    again = playbook(tmp_path, play, *good)
    assert again.changed == 0, again.output[-4000:]
    for secret in SECRETS:
        assert secret not in refused.stdout + first.output + again.output
    check_installed_agent(prefix)

    assert playbook(tmp_path, play, *good, "-e", "meshagent_state=absent").changed > 0
    left = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*"))
    assert left == ["etc", "etc/systemd", "etc/systemd/system", "opt", "var", "var/lib",
                    "var/lib/meshagent"]


@pytest.mark.slow
def test_both_roles_from_source_install_idempotently_and_uninstall(tmp_path: Path) -> None:
    """A central agent and an agent on one host, from meshagent's source directory (built
    into a wheel on the controller): installed, applied again with nothing changed,
    validated by the installed meshagent itself, removed twice (the second run changes
    nothing; the shared virtualenv goes with the last unit; state stays), then purged.
    About 70 s on 2 cores, hence slow; the default suite has the agent-only test above."""
    prefix = tmp_path / "root"
    variables = role_vars(tmp_path, prefix, source_snapshot(tmp_path / "src"))
    play = write_play(tmp_path / "site.yml", "meshagent_central", "meshagent_agent")
    args = write_vars(tmp_path / "vars.json", variables)

    first = playbook(tmp_path, play, *args)
    assert first.changed > 0
    again = playbook(tmp_path, play, *args)
    assert again.changed == 0, again.output[-4000:]
    for secret in SECRETS:
        assert secret not in first.output + again.output
    check_installed_agent(prefix)

    etc, venv = prefix / "etc" / "meshagent", prefix / "opt" / "meshagent" / "venv"
    load = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sys, pathlib; from meshagent.config.central import load_central; "
         "c = load_central(pathlib.Path(sys.argv[1])); print(c.store.token_file)",
         str(etc / "central.toml")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert load.returncode == 0, load.stderr
    assert load.stdout.strip() == str(etc / "central-consul.token")
    assert mode(etc / "central-consul.token") == 0o600
    assert mode(prefix / "var" / "lib" / "meshagent-central") == 0o700
    assert verify(prefix / "etc" / "systemd" / "system" / "meshagent-central.service") == ""

    removed = playbook(tmp_path, play, *args, "-e", "meshagent_state=absent")
    assert removed.changed > 0
    assert playbook(tmp_path, play, *args, "-e", "meshagent_state=absent").changed == 0
    left = sorted(str(p.relative_to(prefix)) for p in prefix.rglob("*"))
    assert left == ["etc", "etc/systemd", "etc/systemd/system", "opt", "var", "var/lib",
                    "var/lib/meshagent", "var/lib/meshagent-central"]
    purged = playbook(tmp_path, play, *args, "-e", "meshagent_state=absent",
                      "-e", "meshagent_purge_state=true")
    assert purged.changed > 0
    assert not (prefix / "var" / "lib" / "meshagent-central").exists()


def test_roles_share_one_set_of_installation_defaults() -> None:
    """meshagent_agent and meshagent_central install the same way (one venv, one user):
    their installation defaults and argument specs cannot drift apart."""
    import yaml

    def installation(role: str) -> tuple[dict[str, Any], dict[str, Any]]:
        defaults = yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text())
        options = yaml.safe_load((ROLES / role / "meta" / "main.yml").read_text())[
            "argument_specs"]["main"]["options"]
        common = yaml.safe_load((ROLES / "meshagent_common" / "meta" / "main.yml").read_text())[
            "argument_specs"]["main"]["options"]
        return ({k: v for k, v in defaults.items() if k in common},
                {k: v for k, v in options.items() if k in common})

    agent, central = installation("meshagent_agent"), installation("meshagent_central")
    assert agent[1] == central[1]
    assert {k: v for k, v in agent[0].items() if k != "meshagent_purge_state"} == {
        k: v for k, v in central[0].items() if k != "meshagent_purge_state"}
    assert "meshagent_package_source" not in agent[0]  # required: no default on purpose


def test_every_config_key_has_a_role_variable() -> None:
    """agent.toml's and central.toml's top-level keys are meshagent_<key> and
    meshagent_central_<key> in the roles' argument specs, and the templates render them:
    a key added to the config without the roles fails here."""
    import msgspec
    import yaml

    from meshagent.config.agent import AgentConfig
    from meshagent.config.central import CentralConfig

    for role, config_type, prefix, template in (
        ("meshagent_agent", AgentConfig, "meshagent_", "agent.toml.j2"),
        ("meshagent_central", CentralConfig, "meshagent_central_", "central.toml.j2"),
    ):
        options = yaml.safe_load((ROLES / role / "meta" / "main.yml").read_text())[
            "argument_specs"]["main"]["options"]
        text = (ROLES / role / "templates" / template).read_text()
        for field in msgspec.structs.fields(config_type):
            assert f"{prefix}{field.name}" in options, f"{role}: no {prefix}{field.name}"
            assert f"'{field.name}'" in text or f"{prefix}{field.name}" in text, (
                f"{template} does not render {field.name}")
