"""Snapshot: the complete, immutable configuration one agent's data path serves from.

Invariants:
* Values are frozen msgspec Structs; a change is a whole new ``Snapshot`` with a
  higher ``version``. A connection pins the snapshot it started with.
* New fields always get a default, so an older agent can decode a newer snapshot
  (unknown fields are skipped, not rejected).
"""

from __future__ import annotations

import ipaddress
from typing import Literal

import msgspec

SCHEMA_VERSION = 1

Protocol = Literal["tcp", "http"]
MtlsMode = Literal["strict", "permissive", "off"]


def is_ip_address(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (not a name): what the agent's
    configuration requires of a bind or an endpoint's host, and what lets the data
    path connect an app's host without the resolver."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_port(host: str, port: int | str) -> str:
    """``host:port``, an IPv6 address in brackets (as a URL and a Host field write it)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Endpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One instance of a service: the public mTLS address of the agent fronting it."""

    host: str
    port: int
    service: str
    node: str = ""
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class Timeouts(msgspec.Struct, frozen=True, kw_only=True):
    """Deadlines of the data path, in seconds."""

    connect_seconds: float = 5.0
    handshake_seconds: float = 10.0
    idle_seconds: float = 3600.0
    request_head_seconds: float = 30.0  # HTTP: first byte to end of head, else 408


class InboundListener(msgspec.Struct, frozen=True, kw_only=True):
    """Mesh -> local app: terminate mTLS on ``bind:port``, forward to ``app_host:app_port``."""

    name: str
    service: str
    bind: str
    port: int
    app_host: str = "127.0.0.1"
    app_port: int
    protocol: Protocol = "tcp"
    max_connections: int = 10_000


class OutboundListener(msgspec.Struct, frozen=True, kw_only=True):
    """Local app -> mesh: accept plain TCP on ``bind:port``, open mTLS to an endpoint of
    ``service``, presenting the identity of ``source``."""

    name: str
    service: str
    source: str
    bind: str
    port: int
    protocol: Protocol = "tcp"
    max_connections: int = 10_000


class ValueMatch(msgspec.Struct, frozen=True, kw_only=True):
    """A header (name lower-cased) or query parameter condition: exactly one of exact,
    regex (full match), present."""

    name: str
    exact: str | None = None
    regex: str | None = None
    present: bool = False


class HttpMatch(msgspec.Struct, frozen=True, kw_only=True):
    """Every given condition must hold; an empty match matches every request."""

    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()


class Backend(msgspec.Struct, frozen=True, kw_only=True):
    """A weighted service subset: the endpoints of ``service`` whose tags include ``tags``."""

    service: str
    tags: tuple[tuple[str, str], ...] = ()
    weight: float = 1.0

    def label(self) -> str:
        tags = ",".join(f"{k}={v}" for k, v in self.tags)
        return f"{self.service}[{tags}]" if tags else self.service


class RouteRule(msgspec.Struct, frozen=True, kw_only=True):
    """Match -> weighted backends, optionally sticky and with a path rewrite."""

    route: str  # the TrafficRoute it came from ("" for the implicit default)
    match: HttpMatch = HttpMatch()
    backends: tuple[Backend, ...]
    rewrite_prefix: str | None = None
    sticky_cookie: str | None = None
    sticky_header: str | None = None


class OutboundRoutes(msgspec.Struct, frozen=True, kw_only=True):
    """The rules of one outbound, in order; the first that matches wins."""

    rules: tuple[RouteRule, ...]

    def services(self) -> set[str]:
        return {b.service for rule in self.rules for b in rule.backends}


class RequestPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Timeouts and retries of HTTP requests to one service (or one route to it)."""

    request_seconds: float | None = None  # the whole request, retries included
    per_try_seconds: float | None = None
    connect_seconds: float | None = None  # TCP connect to an endpoint; default: timeouts
    idle_seconds: float | None = None  # a connection with no bytes moving; default: timeouts
    retry_attempts: int = 1  # tries in all
    retry_on: tuple[str, ...] = ()  # "reset", "timeout" (connect failures always fail over)
    retry_statuses: tuple[int, ...] = ()
    retry_idempotent_only: bool = True
    backoff_base_seconds: float = 0.025
    backoff_max_seconds: float = 0.25
    budget_percent: float = 20.0
    min_retries_per_second: float = 10.0


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the data path of one agent needs, at one version."""

    schema_version: int = SCHEMA_VERSION
    version: int
    mesh: str
    # strict: mTLS only; permissive: inbounds also take plaintext (migration);
    # off: outbounds speak plaintext, inbounds take both.
    mtls: MtlsMode = "strict"
    inbounds: tuple[InboundListener, ...] = ()
    outbounds: tuple[OutboundListener, ...] = ()
    endpoints: dict[str, tuple[Endpoint, ...]] = {}
    timeouts: Timeouts = Timeouts()
    routes: dict[str, OutboundRoutes] = {}  # by outbound service; none: all to the service
    # Who may call each inbound service: source services, or "*". An inbound without an
    # entry takes every caller of the mesh when default_allow, none otherwise.
    permissions: dict[str, tuple[str, ...]] = {}
    default_allow: bool = True
    # Timeout and Retry policies: by "service", or "service/route" for one route.
    request_policies: dict[str, RequestPolicy] = {}

    def request_policy(self, service: str, route: str) -> RequestPolicy | None:
        policies = self.request_policies
        return policies.get(f"{service}/{route}") or policies.get(service)

    def connect_seconds(self, service: str) -> float:
        """The connect deadline to ``service``: its Timeout policy's, else the agent's."""
        policy = self.request_policies.get(service)
        if policy is not None and policy.connect_seconds is not None:
            return policy.connect_seconds
        return self.timeouts.connect_seconds

    def connection_seconds(self, service: str) -> float:
        """The longest a new mTLS connection to ``service`` may take: its connect
        deadline, then the handshake's. A wait in line for a connection, or for a pooled
        one's ``OPENED``, is bounded by it too."""
        return self.connect_seconds(service) + self.timeouts.handshake_seconds

    def idle_seconds(self, service: str) -> float:
        """How long a connection to ``service`` may move no bytes before it is closed."""
        policy = self.request_policies.get(service)
        if policy is not None and policy.idle_seconds is not None:
            return policy.idle_seconds
        return self.timeouts.idle_seconds

    def may_call(self, source: str, destination: str) -> bool:
        allowed = self.permissions.get(destination)
        if allowed is None:
            return self.default_allow
        return "*" in allowed or source in allowed

    def tcp_route_problems(self) -> list[str]:
        """Route rules a TCP outbound cannot apply: it splits each connection by its
        first rule without conditions (or the default) and never sees a path, method,
        header or query. One line per rule, for the log."""
        problems = []
        for outbound in self.outbounds:
            if outbound.protocol != "tcp":
                continue
            routes = self.routes.get(outbound.service)
            for n, rule in enumerate(routes.rules if routes is not None else ()):
                if rule.match != HttpMatch():
                    problems.append(
                        f"outbound {outbound.name}: TrafficRoute {rule.route} rule {n} matches "
                        "on HTTP fields, but the outbound is TCP, so it never applies; "
                        'set protocol = "http" on the outbound (and on the inbounds it reaches)'
                    )
        return problems

    def endpoints_of(self, service: str) -> tuple[Endpoint, ...]:
        return self.endpoints.get(service, ())

    def with_endpoints(self, service: str, endpoints: tuple[Endpoint, ...]) -> Snapshot:
        """A new snapshot, one version up, with ``service``'s endpoints replaced."""
        merged = dict(self.endpoints)
        merged[service] = endpoints
        return msgspec.structs.replace(self, version=self.version + 1, endpoints=merged)
