"""systemd/meshagent.service and systemd/meshagent-central.service: what the units
promise, checked by systemd's own parser (``systemd-analyze verify``, no PID 1 needed)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from meshagent.config.agent import AgentConfig
from meshagent.config.load import load_toml
from tests.e2e.harness import agent_config, free_port, start_agent
from tests.install.units import (
    INSTALLED_BINARY,
    ROOT,
    UNIT_DIR,
    meshagent_binary,
    seconds,
    unit_keys,
    verify,
)
from tests.support.pki import make_ca

UNITS = ["meshagent.service", "meshagent-central.service"]
HARDENING = {
    "Service.NoNewPrivileges": "yes",
    "Service.ProtectSystem": "strict",
    "Service.ProtectHome": "yes",
    "Service.PrivateTmp": "yes",
    "Service.CapabilityBoundingSet": "",
    "Service.AmbientCapabilities": "",
    "Service.User": "meshagent",
    "Service.Group": "meshagent",
    "Service.KillSignal": "SIGTERM",
    "Service.Restart": "on-failure",
    "Service.NotifyAccess": "main",
    "Install.WantedBy": "multi-user.target",
}


def rendered(tmp_path: Path, name: str) -> Path:
    """The unit with ExecStart pointing at this venv's meshagent (verify needs it to exist)."""
    text = (UNIT_DIR / name).read_text()
    assert INSTALLED_BINARY in text
    path = tmp_path / name
    path.write_text(text.replace(INSTALLED_BINARY, meshagent_binary()))
    return path


@pytest.mark.parametrize("name", UNITS)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, name: str) -> None:
    assert verify(rendered(tmp_path, name)) == ""


def test_verify_reports_what_systemd_would_ignore(tmp_path: Path) -> None:
    """The check above means something: a misspelt key is reported although verify exits 0."""
    path = rendered(tmp_path, "meshagent.service")
    path.write_text(path.read_text().replace("WatchdogSec=", "WatchdogSecs="))
    assert "Unknown key" in verify(path)


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_as_a_hardened_system_user(name: str) -> None:
    keys = unit_keys((UNIT_DIR / name).read_text())
    for key, value in HARDENING.items():
        assert keys.get(key) == [value], f"{name}: {key}"
    assert seconds(keys["Service.WatchdogSec"][0]) >= 10
    assert int(keys["Service.LimitNOFILE"][0]) >= 65536
    for directory in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert keys[f"Service.{directory}"], f"{name}: {directory}"
    state = keys["Service.StateDirectory"][0]
    assert keys["Service.ReadWritePaths"] == [f"/var/lib/{state}"]


def test_agent_unit_is_notify_reloads_with_sighup_and_outlasts_the_drain() -> None:
    keys = unit_keys((UNIT_DIR / "meshagent.service").read_text())
    assert keys["Service.Type"] == ["notify"]
    assert keys["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert keys["Service.ExecStart"] == [
        f"{INSTALLED_BINARY} run --config /etc/meshagent/agent.toml"
    ]
    example = load_toml(ROOT / "examples" / "agent.toml", AgentConfig)
    deregister_and_close = 2 + 2  # registration.py and run_agent bound both to 2 s
    stop = seconds(keys["Service.TimeoutStopSec"][0])
    assert stop > float(example.limits.drain_timeout) + deregister_and_close
    # The commented alternative for ports below 1024 is there to be found.
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in (UNIT_DIR / "meshagent.service").read_text()


def test_central_unit_stops_within_its_grace() -> None:
    from meshagent.central.main import GRACEFUL_SECONDS

    keys = unit_keys((UNIT_DIR / "meshagent-central.service").read_text())
    assert keys["Service.Type"] == ["notify"]  # READY=1 once the API serves
    assert keys["Service.ExecStart"] == [
        f"{INSTALLED_BINARY} central --config /etc/meshagent/central.toml"
    ]
    assert seconds(keys["Service.TimeoutStopSec"][0]) > GRACEFUL_SECONDS + 2
    assert "Service.ExecReload" not in keys  # a SIGHUP would end it: no reload to offer


def test_agent_without_policies_survives_sighup(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", "shop")
    config = agent_config("web", "127.0.0.1", ca, "web", consul=None,
                          outbound=[{"service": "orders", "port": free_port(),
                                     "endpoints": ["127.0.0.3:9"]}])
    agent = start_agent(config, tmp_path, "web")
    try:
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while "nothing to reload" not in agent.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.proc.poll() is None
        assert "nothing to reload" in agent.output()
    finally:
        agent.stop()
