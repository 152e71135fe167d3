"""agent.toml's admin: ip:port, unix:/absolute/path, or "" (off)."""

from __future__ import annotations

import pytest

from meshagent.config.agent import AgentConfig, admin_socket_path, validate_agent


def problems_of(admin: str) -> list[str]:
    config = AgentConfig(mesh="shop", admin=admin)
    return [p for p in validate_agent(config) if p.startswith("admin")]


@pytest.mark.parametrize("admin", ["127.0.0.1:15000", "127.0.0.1:0", "", "unix:/run/meshagent/admin.sock"])
def test_accepted(admin: str) -> None:
    assert problems_of(admin) == []


@pytest.mark.parametrize(
    ("admin", "needle"),
    [
        ("unix:run/admin.sock", "must be an absolute file path"),
        ("unix:", "must be an absolute file path"),
        ("unix:/run/meshagent/", "must be an absolute file path"),
        ("unix:/" + "x" * 120, "at most 107 bytes"),
        ("localhost:15000", "is not ip:port or unix:/absolute/path"),
    ],
)
def test_refused_with_the_fix(admin: str, needle: str) -> None:
    (problem,) = problems_of(admin)
    assert needle in problem and "\n" not in problem


def test_socket_path() -> None:
    assert str(admin_socket_path(AgentConfig(mesh="shop", admin="unix:/run/m/a.sock"))) == "/run/m/a.sock"
    assert admin_socket_path(AgentConfig(mesh="shop")) is None
