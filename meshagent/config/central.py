"""CentralConfig: the static settings of one ``meshagent central`` process (central.toml).

Two stages, as everywhere in meshagent:
1. shape: ``load_toml`` decodes strictly (unknown keys, wrong types -> ConfigError);
2. meaning: ``validate_central`` checks what types cannot (the listen address, store
   settings that go together, positive durations, Consul's session limits) and returns
   every violation.

Every key is documented once, with its default, in ``examples/central.toml``. Pure: no
I/O beyond what ``load_central`` reads.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

import msgspec

from meshagent.config.load import ConfigError, Duration, load_toml

DEFAULT_LISTEN = "127.0.0.1:5681"
SEAL_KEY_FILE = "seal.key"
STORE_FILE = "central.db"
# Consul's limits for sessions: TTL up to 24 h, lock-delay up to 60 s.
MAX_SESSION_TTL_SECONDS = 24 * 3600.0
MAX_LOCK_DELAY_SECONDS = 60.0
# Agents report their status at most this often, and at least this often.
MIN_HEARTBEAT_SECONDS = 1.0
MAX_HEARTBEAT_SECONDS = 300.0
MAX_ROTATION_SPREAD_SECONDS = 24 * 3600.0


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class StoreSettings(_Strict, frozen=True, kw_only=True):
    """Where the central agent keeps meshes, policies, tokens and the audit log."""

    kind: Literal["sqlite", "consul"] = "sqlite"
    path: str | None = None  # sqlite: the database file; default <data_dir>/central.db
    address: str = "http://127.0.0.1:8500"  # consul: the Consul HTTP address
    token_file: str | None = None  # consul: ACL token file, sent as X-Consul-Token
    prefix: str = "meshagent/"  # consul: KV key prefix
    # consul: the leader election's session (replicas elect one leader for the jobs that
    # must run once). A dead leader is replaced after at most 2 x session_ttl + lock_delay.
    session_ttl: Duration = Duration(10.0)
    lock_delay: Duration = Duration(1.0)


class CentralLogSettings(_Strict, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["logfmt", "json"] = "logfmt"


class CentralConfig(_Strict, frozen=True, kw_only=True):
    """central.toml. Durations are seconds (``Duration``), written "24h" in TOML."""

    listen: str = DEFAULT_LISTEN
    # More names for the server certificate: the DNS names and IP addresses clients
    # reach it by (a DNS name or VIP in front of replicas, a NAT address).
    server_names: list[str] = []
    data_dir: str
    seal_key_file: str | None = None  # default <data_dir>/seal.key
    cert_ttl: Duration = Duration(24 * 3600.0)
    join_token_ttl: Duration = Duration(3600.0)
    audit_retention: Duration = Duration(90 * 86400.0)  # the leader deletes older entries
    leader_jobs_interval: Duration = Duration(600.0)  # how often the leader runs its jobs
    # How often agents report their status (the configs tell them); a dataplane silent
    # for three of these is offline and leaves the built-in catalog.
    heartbeat_interval: Duration = Duration(10.0)
    # During a CA rotation, agents renew their certificates of the previous CA at a
    # random moment within this window, so a large mesh does not renew all at once.
    ca_rotation_spread: Duration = Duration(120.0)
    # During a CA rotation, the previous CA keeps signing until every online dataplane
    # has applied the new trust bundle, or for this long at most (then a warning names
    # those that have not).
    ca_rotation_switch_timeout: Duration = Duration(600.0)
    store: StoreSettings = StoreSettings()
    log: CentralLogSettings = CentralLogSettings()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def seal_key_path(self) -> Path:
        return Path(self.seal_key_file) if self.seal_key_file else self.data_path / SEAL_KEY_FILE

    @property
    def store_path(self) -> Path:
        return Path(self.store.path) if self.store.path else self.data_path / STORE_FILE


def split_listen(listen: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:5681"`` for IPv6) -> (host, port).

    Raises:
        ValueError: no port, a port out of range, or an empty host.
    """
    host, sep, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f'"{listen}" is not host:port, e.g. "127.0.0.1:5681"')
    return host, int(port_text)


def validate_central(config: CentralConfig) -> list[str]:
    """The meaning checks of central.toml: every problem, each one line ``key: what``."""
    problems: list[str] = []
    try:
        host, _ = split_listen(config.listen)
        if host != "localhost":
            ipaddress.ip_address(host)
    except ValueError as exc:
        text = str(exc)
        if "is not host:port" not in text:
            text = f'"{config.listen}": the host must be an IP address or localhost'
        problems.append(f"listen: {text}")
    problems.extend(_server_name_problems(config.server_names))
    if not config.data_dir:
        problems.append("data_dir: must not be empty")
    for key, seconds, example in (
        ("cert_ttl", config.cert_ttl, "1h"),
        ("join_token_ttl", config.join_token_ttl, "1h"),
        ("audit_retention", config.audit_retention, "90d"),
        ("leader_jobs_interval", config.leader_jobs_interval, "10m"),
    ):
        if seconds <= 0:
            problems.append(f'{key}: must be more than 0, e.g. "{example}"')
    if not MIN_HEARTBEAT_SECONDS <= config.heartbeat_interval <= MAX_HEARTBEAT_SECONDS:
        problems.append('heartbeat_interval: must be from 1s to 5m, e.g. "10s"')
    if not 0 <= config.ca_rotation_spread <= MAX_ROTATION_SPREAD_SECONDS:
        problems.append('ca_rotation_spread: must be from 0s to 24h, e.g. "2m"')
    if not 0 <= config.ca_rotation_switch_timeout <= MAX_ROTATION_SPREAD_SECONDS:
        problems.append('ca_rotation_switch_timeout: must be from 0s to 24h, e.g. "10m"')
    if not 0 < config.store.session_ttl <= MAX_SESSION_TTL_SECONDS:
        problems.append(
            'store.session_ttl: must be more than 0 and at most 24h, e.g. "10s" (Consul '
            "also refuses TTLs under its session_ttl_min, 10s by default)"
        )
    if config.store.lock_delay > MAX_LOCK_DELAY_SECONDS:
        problems.append('store.lock_delay: must be at most 60s (Consul\'s limit), e.g. "1s"')
    if config.store.kind == "consul" and not config.store.address.startswith(
        ("http://", "https://")
    ):
        problems.append(f'store.address: "{config.store.address}" is not an http(s) URL')
    return problems


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def is_dns_name(name: str) -> bool:
    """A DNS name a certificate can hold: dot-separated labels of letters, digits and
    '-' (not at either end), at most 253 characters; no wildcard, no trailing dot."""
    return len(name) <= 253 and all(
        _DNS_LABEL.fullmatch(label) for label in name.lower().split(".")
    )


def _server_name_problems(names: list[str]) -> list[str]:
    problems: list[str] = []
    for n, name in enumerate(names):
        try:
            ipaddress.ip_address(name)
            continue
        except ValueError:
            pass
        if not is_dns_name(name):
            problems.append(
                f"server_names[{n}]: {name!r} is not a DNS name or an IP address, e.g. "
                '"central.example.com" or "10.0.0.100" (no wildcards, no port)'
            )
    return problems


def load_central(path: Path) -> CentralConfig:
    """Read and check central.toml.

    Raises:
        ConfigError: the first problem (and how many more), one line naming ``path``.
    """
    config = load_toml(path, CentralConfig)
    problems = validate_central(config)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{path}: {problems[0]}{more}")
    return config
