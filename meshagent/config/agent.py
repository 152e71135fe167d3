"""AgentConfig: the static settings of one ``meshagent run`` process (agent.toml).

Two stages, as everywhere in meshagent:
1. shape: ``load_toml`` decodes strictly (unknown keys, wrong types -> ConfigError);
2. meaning: ``validate_agent`` checks what types cannot (port clashes, names,
   identities present) and returns every violation, not just the first.

Every key is documented once, with its default, in ``examples/agent.toml``.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Literal

import msgspec

from meshagent.config.load import ConfigError, Duration, load_toml
from meshagent.snapshot.model import (
    Endpoint,
    InboundListener,
    OutboundListener,
    Snapshot,
    Timeouts,
    is_ip_address,
)

CENTRAL_DIR = "central"
ADMIN_UNIX_PREFIX = "unix:"
MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes on Linux, with the final NUL
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


MAX_WORKERS = 256


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ConsulSettings(_Strict, frozen=True, kw_only=True):
    address: str = "http://127.0.0.1:8500"
    token_file: str | None = None
    # How long one blocking query waits for a change before Consul answers anyway.
    watch_wait: Duration = Duration(30.0)
    # How long an inbound stays registered with a critical check before Consul drops it.
    deregister_critical_after: Duration = Duration(3600.0)


class TlsSettings(_Strict, frozen=True, kw_only=True):
    ca: str
    cert: str
    key: str


class CentralSettings(_Strict, frozen=True, kw_only=True):
    """Join a mesh managed by a central agent: certificates and policies come from it."""

    # "https://central:5681", or a list: replicas of one central agent (one store) with
    # no load balancer in front; the agent uses one that answers and moves on when it
    # fails.
    url: str | list[str]
    ca: str  # the central agent's CA certificate (central-ca.pem in its data_dir)
    token_file: str  # the join token (from: meshagent token create); read at first join
    dataplane: str | None = None  # this agent's name in the mesh; default: node
    # How long the first join keeps retrying an unreachable central agent before the
    # agent gives up (a refused token gives up at once).
    join_timeout: Duration = Duration(60.0)

    @property
    def urls(self) -> tuple[str, ...]:
        """Every URL of ``url``, in order, without a trailing slash."""
        urls = [self.url] if isinstance(self.url, str) else self.url
        return tuple(url.rstrip("/") for url in urls)


class HealthSettings(_Strict, frozen=True, kw_only=True):
    """How the agent decides the local app is healthy. With none of tcp/http/pidfile/
    command set, the check is the agent's own liveness (always passing while it runs)."""

    tcp: bool = False
    http: str | None = None  # a path, e.g. "/healthz": 2xx or 3xx is healthy
    pidfile: str | None = None
    command: str | None = None  # a substring of the app's command line
    interval: Duration = Duration(10.0)
    timeout: Duration = Duration(2.0)


class InboundSettings(_Strict, frozen=True, kw_only=True):
    service: str
    port: int
    app_port: int
    # Where the app listens: an IP address of this host. The hop from the agent to the
    # app is plaintext, so it should not leave the host.
    app_host: str = "127.0.0.1"
    bind: str | None = None
    protocol: Literal["tcp", "http"] = "tcp"
    tags: dict[str, str] = {}
    health: HealthSettings = HealthSettings()
    cert: str | None = None
    key: str | None = None
    max_connections: int | None = None


class StaticEndpoint(_Strict, frozen=True, kw_only=True):
    """A fixed endpoint with tags, for routes that split by tags without Consul."""

    address: str  # "host:port" of another agent's inbound
    service: str | None = None  # default: the outbound's service
    tags: dict[str, str] = {}


class OutboundSettings(_Strict, frozen=True, kw_only=True):
    service: str
    port: int
    bind: str = "127.0.0.1"
    protocol: Literal["tcp", "http"] = "tcp"
    source: str | None = None
    # Fixed endpoints ("host:port" of the other agents' inbounds), for meshes without
    # Consul. When set, Consul is not asked for this service.
    endpoints: list[str | StaticEndpoint] = []
    max_connections: int | None = None


class LimitSettings(_Strict, frozen=True, kw_only=True):
    connect_timeout: Duration = Duration(5.0)
    handshake_timeout: Duration = Duration(10.0)
    idle_timeout: Duration = Duration(3600.0)
    drain_timeout: Duration = Duration(30.0)
    max_connections: int = 10_000


class LogSettings(_Strict, frozen=True, kw_only=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["logfmt", "json"] = "logfmt"
    # HTTP access log (one line per request): "stderr" (with the rest), "off", or an
    # absolute file path (appended to; rotate it with logrotate's copytruncate).
    access: str = "stderr"


class AgentConfig(_Strict, frozen=True, kw_only=True):
    mesh: str
    node: str = msgspec.field(default_factory=socket.gethostname)
    address: str = "127.0.0.1"
    bind: str | None = None
    state_dir: str | None = None
    # strict: mTLS only between agents; permissive: inbounds also accept plaintext
    # callers (the migration step); off: outbounds speak plaintext to other agents.
    mtls: Literal["strict", "permissive", "off"] = "strict"
    # A policy file or directory (TrafficRoute, ...), for hosts without a central agent.
    # Reloaded on SIGHUP.
    policies: str | None = None
    # The admin endpoint: /ready, /stats, /snapshot and Prometheus /metrics (what
    # `meshagent status` reads). "ip:port" (loopback by default), "unix:/absolute/path"
    # (a socket made 0660, e.g. "unix:/run/meshagent/admin.sock"), or "" for none.
    admin: str = "127.0.0.1:15000"
    # Processes serving the listeners (SO_REUSEPORT): "auto" = one per core, or a count.
    # The agent process is one of them; it alone talks to Consul and the central agent.
    workers: int | str = "auto"
    consul: ConsulSettings | None = None
    central: CentralSettings | None = None
    tls: TlsSettings | None = None
    inbound: list[InboundSettings] = []
    outbound: list[OutboundSettings] = []
    limits: LimitSettings = LimitSettings()
    log: LogSettings = LogSettings()

    def inbound_bind(self, inbound: InboundSettings) -> str:
        return inbound.bind or self.bind or self.address

    @property
    def dataplane_name(self) -> str:
        return (self.central.dataplane if self.central else None) or self.node

    @property
    def central_dir(self) -> Path:
        """Where a joined agent keeps its credentials, certificates and last config."""
        return Path(self.state_dir or ".") / CENTRAL_DIR

    def worker_count(self, cores: int) -> int:
        """How many processes serve the listeners on a host with ``cores`` cores."""
        return cores if isinstance(self.workers, str) else self.workers

    def identities(self) -> list[str]:
        """Every identity this host presents: its inbound services, its outbound sources."""
        names = {i.service for i in self.inbound}
        names |= {self.outbound_source(o) for o in self.outbound}
        return sorted(n for n in names if n)

    def identity_files(self, service: str) -> TlsSettings | None:
        """The CA, cert and key this host presents as ``service`` (None if it has none).

        With [central], the files the central agent issued, under ``state_dir``: one PEM
        per service holding the certificate and its key (renewed as one atomic file)."""
        if self.central is not None:
            if service not in self.identities():
                return None
            pem = str(self.central_dir / f"{service}.pem")
            return TlsSettings(ca=str(self.central_dir / "ca.pem"), cert=pem, key=pem)
        for inbound in self.inbound:
            if inbound.service == service and inbound.cert and inbound.key:
                ca = self.tls.ca if self.tls else None
                return TlsSettings(ca=ca, cert=inbound.cert, key=inbound.key) if ca else None
        if self.tls is not None:
            return self.tls
        return None

    def outbound_source(self, outbound: OutboundSettings) -> str:
        if outbound.source:
            return outbound.source
        if len(self.inbound) == 1:
            return self.inbound[0].service
        return ""


def _app_host_problem(text: str) -> str | None:
    """What is wrong with ``text`` as an inbound's app_host, or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return "is not an IP address; give the address the app listens on, such as 127.0.0.1"
    if address.is_unspecified:
        return (
            "means every address: an app may listen there, but the agent needs one to "
            "connect to; give 127.0.0.1 for an app that listens on 0.0.0.0"
        )
    if address.is_multicast:
        return "is a multicast address; give the address the app listens on"
    return None


def _is_name(text: str) -> bool:
    return (
        0 < len(text) <= 63
        and set(text) <= _NAME_CHARS
        and text[0] != "-"
        and text[-1] != "-"
    )


def validate_agent(config: AgentConfig) -> list[str]:
    """Return every meaning-level problem, each as ``key: what is wrong — fix``."""
    problems: list[str] = []
    name_rule = "use lowercase letters, digits and '-' (at most 63)"
    if not _is_name(config.mesh):
        problems.append(f"mesh: {config.mesh!r} is not a valid name; {name_rule}")
    if not is_ip_address(config.address):
        problems.append(f"address: {config.address!r} is not an IP address")
    if config.bind is not None and not is_ip_address(config.bind):
        problems.append(f"bind: {config.bind!r} is not an IP address")
    if config.central is not None:
        problems += _central_problems(config)
    else:
        if config.tls is None and any(not (i.cert and i.key) for i in config.inbound):
            problems.append("tls: missing; add [tls] ca/cert/key, or cert/key on every inbound")
        if config.tls is None and any(i.cert for i in config.inbound):
            problems.append("tls.ca: missing; inbounds with their own cert still need [tls] ca")
    used: dict[tuple[str, int], str] = {}

    def claim(key: str, host: str, port: int) -> None:
        if not 1 <= port <= 65535:
            problems.append(f"{key}: {port} is not a TCP port (1-65535)")
            return
        for (other_host, other_port), owner in used.items():
            overlap = host == other_host or "0.0.0.0" in (host, other_host)
            if other_port == port and overlap:
                problems.append(f"{key}: port {port} is also used by {owner}; pick another port")
                return
        used[(host, port)] = key

    services: set[str] = set()
    for n, inbound in enumerate(config.inbound):
        key = f"inbound[{n}]"
        if not _is_name(inbound.service):
            problems.append(f"{key}.service: {inbound.service!r} is not a valid name; {name_rule}")
        if inbound.service in services:
            problems.append(f"{key}.service: {inbound.service!r} is listed twice")
        services.add(inbound.service)
        bind = config.inbound_bind(inbound)
        if inbound.bind is not None and not is_ip_address(inbound.bind):
            problems.append(f"{key}.bind: {inbound.bind!r} is not an IP address")
        claim(f"{key}.port", bind, inbound.port)
        if not 1 <= inbound.app_port <= 65535:
            problems.append(f"{key}.app_port: {inbound.app_port} is not a TCP port (1-65535)")
        if (why := _app_host_problem(inbound.app_host)) is not None:
            problems.append(f"{key}.app_host: {inbound.app_host!r} {why}")
        if bool(inbound.cert) != bool(inbound.key):
            problems.append(f"{key}: set both cert and key, or neither")
        if inbound.max_connections is not None and inbound.max_connections < 1:
            problems.append(f"{key}.max_connections: must be at least 1")
        health = inbound.health
        if health.interval <= 0 or health.timeout <= 0:
            problems.append(f"{key}.health: interval and timeout must be positive")
        if health.http is not None and not health.http.startswith("/"):
            problems.append(f"{key}.health.http: {health.http!r} must be a path such as /healthz")
    for n, outbound in enumerate(config.outbound):
        key = f"outbound[{n}]"
        if not _is_name(outbound.service):
            problems.append(f"{key}.service: {outbound.service!r} is not a valid name; {name_rule}")
        if not is_ip_address(outbound.bind):
            problems.append(f"{key}.bind: {outbound.bind!r} is not an IP address")
        claim(f"{key}.port", outbound.bind, outbound.port)
        source = config.outbound_source(outbound)
        if not source:
            problems.append(
                f"{key}.source: this host fronts {len(config.inbound)} services; "
                "name the one whose identity this outbound presents"
            )
        elif config.identity_files(source) is None:
            problems.append(
                f"{key}.source: no certificate for {source!r}; add [tls] or its cert/key"
            )
        for m, item in enumerate(outbound.endpoints):
            text = item if isinstance(item, str) else item.address
            host, sep, port = text.rpartition(":")
            good_port = port.isdigit() and 0 < int(port) < 65536
            if not sep or not is_ip_address(host) or not good_port:
                problems.append(f"{key}.endpoints[{m}]: {text!r} is not host:port (IP address)")
        if not outbound.endpoints and config.consul is None and config.central is None:
            problems.append(
                f"{key}: no endpoints, no [consul] and no [central]; add one of them"
            )
        if outbound.max_connections is not None and outbound.max_connections < 1:
            problems.append(f"{key}.max_connections: must be at least 1")
    if config.admin.startswith(ADMIN_UNIX_PREFIX):
        problems += _unix_admin_problems(config.admin)
    elif config.admin:
        host, sep, port = config.admin.rpartition(":")
        if not sep or not is_ip_address(host) or not port.isdigit() or not 0 <= int(port) < 65536:
            problems.append(
                f"admin: {config.admin!r} is not ip:port or unix:/absolute/path "
                '("" turns it off)'
            )
        elif int(port):
            claim("admin", host, int(port))
    for n, inbound in enumerate(config.inbound):
        for (listen_host, listen_port), owner in used.items():
            if listen_port == inbound.app_port and (
                listen_host == inbound.app_host or listen_host in ("0.0.0.0", "::")
            ):
                problems.append(
                    f"inbound[{n}].app_port: {inbound.app_host}:{listen_port} is this agent's "
                    f"own listener ({owner}), not the app's; the agent would connect to itself"
                )
                break
    if config.log.access not in ("stderr", "off") and not config.log.access.startswith("/"):
        problems.append(
            f'log.access: {config.log.access!r} must be "stderr", "off" or an absolute path'
        )
    if config.workers != "auto" and not (
        isinstance(config.workers, int) and 1 <= config.workers <= MAX_WORKERS
    ):
        problems.append(f'workers: {config.workers!r} must be "auto" or 1-{MAX_WORKERS}')
    limits = config.limits
    for field in ("connect_timeout", "handshake_timeout", "idle_timeout", "drain_timeout"):
        if getattr(limits, field) <= 0:
            problems.append(f"limits.{field}: must be positive")
    if limits.max_connections < 1:
        problems.append("limits.max_connections: must be at least 1")
    return problems


def _unix_admin_problems(admin: str) -> list[str]:
    path = admin.removeprefix(ADMIN_UNIX_PREFIX)
    if not path.startswith("/") or path.endswith("/"):
        return [f"admin: {admin!r}: the socket must be an absolute file path, e.g. "
                '"unix:/run/meshagent/admin.sock"']
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        return [f"admin: {admin!r}: a unix socket path has at most "
                f"{MAX_UNIX_PATH_BYTES} bytes; use a shorter one"]
    return []


def admin_socket_path(config: AgentConfig) -> Path | None:
    """The admin unix socket's path, or None when the admin endpoint is TCP or off."""
    if config.admin.startswith(ADMIN_UNIX_PREFIX):
        return Path(config.admin.removeprefix(ADMIN_UNIX_PREFIX))
    return None


def _central_url_problems(url: str | list[str]) -> list[str]:
    """``central.url``: one https:// URL, or a non-empty list of distinct ones."""
    if isinstance(url, str):
        if not url.startswith("https://"):
            return [f"central.url: {url!r} must be an https:// URL"]
        return []
    if not url:
        return [
            'central.url: the list is empty; give the central agent\'s URL, or one per '
            'replica, e.g. ["https://10.0.0.5:5681", "https://10.0.0.6:5681"]'
        ]
    problems: list[str] = []
    seen: set[str] = set()
    for n, item in enumerate(url):
        if not item.startswith("https://"):
            problems.append(f"central.url[{n}]: {item!r} must be an https:// URL")
        elif item.rstrip("/") in seen:
            problems.append(f"central.url[{n}]: {item!r} is listed twice")
        seen.add(item.rstrip("/"))
    return problems


def _central_problems(config: AgentConfig) -> list[str]:
    central = config.central
    assert central is not None
    problems: list[str] = []
    problems.extend(_central_url_problems(central.url))
    if not config.state_dir:
        problems.append(
            "state_dir: required with [central] (certificates and the last config live "
            'there), e.g. state_dir = "/var/lib/meshagent"'
        )
    if config.tls is not None:
        problems.append("tls: remove it; with [central] the central agent issues certificates")
    if any(i.cert or i.key for i in config.inbound):
        problems.append("inbound: remove cert/key; with [central] the central agent issues them")
    if config.policies:
        problems.append("policies: remove it; with [central] policies come from the central agent")
    if central.dataplane is not None and not _is_name(central.dataplane):
        problems.append(f"central.dataplane: {central.dataplane!r} is not a valid name")
    elif central.dataplane is None and not _is_name(config.node):
        problems.append(
            f"node: {config.node!r} is not a valid dataplane name; set central.dataplane"
        )
    if central.join_timeout <= 0:
        problems.append("central.join_timeout: must be positive")
    return problems


def load_agent_config(path: Path) -> AgentConfig:
    """Load and validate agent.toml.

    Raises:
        ConfigError: with one line naming the file, the key and the fix (the first
            problem; ``meshagent check`` prints all of them).
    """
    config = load_toml(path, AgentConfig)
    problems = validate_agent(config)
    if problems:
        raise ConfigError(f"{path}: {problems[0]}")
    return config


def static_endpoint(item: str | StaticEndpoint, service: str) -> Endpoint:
    """A fixed endpoint of an outbound (validated: host:port with an IP address)."""
    text = item if isinstance(item, str) else item.address
    host, _, port = text.rpartition(":")
    if isinstance(item, str):
        return Endpoint(host=host, port=int(port), service=service)
    return Endpoint(
        host=host,
        port=int(port),
        service=item.service or service,
        tags=tuple(sorted(item.tags.items())),
    )


def initial_snapshot(config: AgentConfig) -> Snapshot:
    """The snapshot the agent serves before discovery has said anything."""
    limits = config.limits
    inbounds = tuple(
        InboundListener(
            name=f"inbound:{i.service}:{i.port}",
            service=i.service,
            bind=config.inbound_bind(i),
            port=i.port,
            app_host=i.app_host,
            app_port=i.app_port,
            protocol=i.protocol,
            max_connections=i.max_connections or limits.max_connections,
        )
        for i in config.inbound
    )
    outbounds = tuple(
        OutboundListener(
            name=f"outbound:{o.service}:{o.port}",
            service=o.service,
            source=config.outbound_source(o),
            bind=o.bind,
            port=o.port,
            protocol=o.protocol,
            max_connections=o.max_connections or limits.max_connections,
        )
        for o in config.outbound
    )
    static: dict[str, list[Endpoint]] = {}
    for o in config.outbound:
        for item in o.endpoints:
            endpoint = static_endpoint(item, o.service)
            static.setdefault(endpoint.service, []).append(endpoint)
    return Snapshot(
        version=1,
        mesh=config.mesh,
        mtls=config.mtls,
        inbounds=inbounds,
        outbounds=outbounds,
        endpoints={service: tuple(eps) for service, eps in static.items()},
        timeouts=Timeouts(
            connect_seconds=float(limits.connect_timeout),
            handshake_seconds=float(limits.handshake_timeout),
            idle_seconds=float(limits.idle_timeout),
        ),
    )


__all__ = ["AgentConfig", "ConfigError", "load_agent_config", "validate_agent"]
