"""central.toml keys of the replicas and the leader's jobs: defaults and meaning checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshagent.config.central import CentralConfig, load_central, validate_central
from meshagent.config.load import ConfigError, load_toml


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "central.toml"
    path.write_text(f'data_dir = "{tmp_path}"\n{text}')
    return path


def test_defaults(tmp_path: Path) -> None:
    config = load_central(write(tmp_path, ""))
    assert config.audit_retention == 90 * 86400.0
    assert config.leader_jobs_interval == 600.0
    assert config.heartbeat_interval == 10.0
    assert (config.store.session_ttl, config.store.lock_delay) == (10.0, 1.0)


def test_server_names_take_dns_names_and_addresses(tmp_path: Path) -> None:
    config = load_central(write(
        tmp_path, 'server_names = ["central.example.com", "Central-2.example", "10.0.0.100", "fd00::5"]\n'
    ))
    assert config.server_names == ["central.example.com", "Central-2.example", "10.0.0.100", "fd00::5"]
    assert load_central(write(tmp_path, "")).server_names == []


def test_replica_settings_are_read(tmp_path: Path) -> None:
    config = load_central(
        write(
            tmp_path,
            'audit_retention = "30d"\nleader_jobs_interval = "500ms"\n'
            '[store]\nkind = "consul"\nsession_ttl = "1s"\nlock_delay = "0s"\n',
        )
    )
    assert config.audit_retention == 30 * 86400.0
    assert config.leader_jobs_interval == 0.5
    assert (config.store.session_ttl, config.store.lock_delay) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('audit_retention = "0s"\n', 'audit_retention: must be more than 0, e.g. "90d"'),
        ('leader_jobs_interval = "0ms"\n', 'leader_jobs_interval: must be more than 0, e.g. "10m"'),
        ('heartbeat_interval = "500ms"\n', 'heartbeat_interval: must be from 1s to 5m, e.g. "10s"'),
        ('server_names = ["central.example.com", "*.example.com"]\n',
         "server_names[1]: '*.example.com' is not a DNS name or an IP address"),
        ('server_names = ["central:5681"]\n',
         "server_names[0]: 'central:5681' is not a DNS name or an IP address"),
        ('server_names = ["-bad.example"]\n', "server_names[0]: '-bad.example' is not a DNS name"),
        ('server_names = [""]\n', "server_names[0]: '' is not a DNS name or an IP address"),
        ('heartbeat_interval = "6m"\n', 'heartbeat_interval: must be from 1s to 5m, e.g. "10s"'),
        ('[store]\nsession_ttl = "0s"\n', "store.session_ttl: must be more than 0 and at most 24h"),
        ('[store]\nsession_ttl = "25h"\n', "store.session_ttl: must be more than 0 and at most 24h"),
        ('[store]\nlock_delay = "61s"\n', "store.lock_delay: must be at most 60s"),
    ],
)
def test_problems_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    problems = validate_central(load_toml(write(tmp_path, text), CentralConfig))
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    with pytest.raises(ConfigError) as caught:
        load_central(write(tmp_path, text))
    assert str(caught.value).startswith(f"{tmp_path / 'central.toml'}: {problem}")
    assert "\n" not in str(caught.value)


def test_a_duration_that_is_not_one_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"audit_retention"):
        load_central(write(tmp_path, 'audit_retention = "forever"\n'))
    with pytest.raises(ConfigError, match=r"store\.lock_delay"):
        load_central(write(tmp_path, '[store]\nlock_delay = "-1s"\n'))


def test_example_documents_every_key_with_its_default() -> None:
    example = Path(__file__).parents[2] / "examples" / "central.toml"
    text = example.read_text()
    for key in (
        "audit_retention", "leader_jobs_interval", "heartbeat_interval", "session_ttl", "lock_delay",
        "server_names",
    ):
        assert f"{key} = " in text, key
    config = load_central(example)
    assert config.audit_retention == 90 * 86400.0 and config.leader_jobs_interval == 600.0
