"""``meshagent status`` and ``meshagent doctor``: this host's agent, seen from the host.

* ``status`` reads the running agent's admin endpoint (``admin`` in agent.toml: an
  ``ip:port`` or ``unix:/path``) and prints its inbounds, outbounds, endpoints per
  service, certificate expiry and snapshot version, and, with [consul], the Consul
  check of each inbound. ``-o json`` prints the same data as read.
* ``doctor`` checks what usually breaks a host: the config, its ports, Consul and its
  ACL token, the central agent (TLS with its CA) and the clock against it,
  certificates, and the permissions of keys and tokens. One line per check; each
  problem says how to fix it; exit 1 when any check fails.

Every user error is one ``error:`` line on stderr and exit 1. Every network wait is
bounded (``TIMEOUT_SECONDS``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

from meshagent.cli.pki import _Command
from meshagent.config.agent import AgentConfig, admin_socket_path
from meshagent.snapshot.model import host_port

TIMEOUT_SECONDS = 5.0
MAX_CLOCK_SKEW_SECONDS = 30.0
DEFAULT_CONFIG = Path("/etc/meshagent/agent.toml")
CERT_METRIC = "meshagent_certificate_expiry_timestamp_seconds"

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", metavar="PATH", help="Path to agent.toml.")
]


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _load(path: Path) -> AgentConfig:
    """agent.toml, shape and meaning checked; a problem is one error line."""
    from meshagent.config.agent import load_agent_config
    from meshagent.config.load import ConfigError

    try:
        return load_agent_config(path)
    except ConfigError as exc:
        hint = " (pass --config PATH)" if path == DEFAULT_CONFIG and not path.exists() else ""
        _fail(f"{exc}{hint}")


# ---------------------------------------------------------------------------- admin client


class AdminUnreachable(Exception):
    """The agent's admin endpoint did not answer; one line with the likely fix."""


def _os_error_of(exc: BaseException) -> OSError | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {TIMEOUT_SECONDS:g} s"
    os_error = _os_error_of(exc)
    if isinstance(os_error, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {os_error.verify_message}"
    if isinstance(os_error, ssl.SSLError):
        return str(os_error.reason or os_error).lower().replace("_", " ")
    if os_error is not None and os_error.strerror:
        return os_error.strerror.lower()
    return str(exc) or type(exc).__name__


class AdminClient:
    """Blocking GETs to one agent's admin endpoint (TCP or unix socket)."""

    def __init__(self, address: str) -> None:
        self.address = address
        path = address.removeprefix("unix:") if address.startswith("unix:") else None
        if path is not None:
            transport = httpx.HTTPTransport(uds=path)
            base = "http://meshagent"
        else:
            host, _, port = address.rpartition(":")
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            transport = httpx.HTTPTransport()
            base = f"http://{host_port(host, port)}"
        self._http = httpx.Client(
            base_url=base, transport=transport, timeout=TIMEOUT_SECONDS, trust_env=False
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def get(self, path: str) -> httpx.Response:
        try:
            return self._http.get(path)
        except httpx.HTTPError as exc:
            reason = _reason(exc)
            if isinstance(_os_error_of(exc), PermissionError):
                fix = "run as root or as a member of the agent's group (meshagent)"
            else:
                fix = "is the agent running? systemctl status meshagent"
            raise AdminUnreachable(f"admin {self.address}: {reason} — {fix}") from None

    def json(self, path: str) -> Any:
        response = self.get(path)
        if response.status_code != 200:
            raise AdminUnreachable(
                f"admin {self.address}{path}: HTTP {response.status_code} {response.text.strip()}"
            )
        return response.json()


def certificate_expiry(metrics_text: str) -> dict[str, float]:
    """service -> not-after (Unix time), from the agent's Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    expiry: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == CERT_METRIC:
            for sample in family.samples:
                expiry[sample.labels["service"]] = float(sample.value)
    return expiry


def processes(metrics_text: str) -> dict[str, int]:
    """{"serving": processes serving the listeners, "worker_restarts": ...}, from the
    agent's Prometheus exposition (empty for an agent that does not say)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, int] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "meshagent_processes":
                found["serving"] = int(sample.value)
            elif sample.name == "meshagent_worker_restarts_total":
                found["worker_restarts"] = int(sample.value)
    return found


def read_agent(admin: AdminClient) -> dict[str, Any]:
    """What the running agent says about itself (readiness, snapshot, counters,
    certificates). Raises AdminUnreachable."""
    ready = admin.get("/ready").status_code == 200
    data: dict[str, Any] = {"admin": admin.address, "ready": ready}
    if ready:
        data["snapshot"] = admin.json("/snapshot")
        data["stats"] = admin.json("/stats")
        metrics = admin.get("/metrics")
        data["certificates"] = certificate_expiry(metrics.text) if metrics.is_success else {}
        data["processes"] = processes(metrics.text) if metrics.is_success else {}
    return data


# ---------------------------------------------------------------------------- Consul


def _consul_token(config: AgentConfig) -> str | None:
    """The ACL token (None without token_file). Raises OSError when unreadable."""
    if config.consul is None or config.consul.token_file is None:
        return None
    return Path(config.consul.token_file).read_text().strip() or None


def consul_checks(config: AgentConfig) -> dict[str, str]:
    """service id -> the status of its TTL check in the local Consul agent ("passing",
    "critical", "not registered"), or every inbound "unknown: <why>"."""
    from meshagent.agent.registration import check_id, service_id

    assert config.consul is not None
    ids = {service_id(config, i): check_id(config, i) for i in config.inbound}
    try:
        token = _consul_token(config)
    except OSError as exc:
        why = f"unknown: cannot read consul.token_file ({(exc.strerror or str(exc)).lower()})"
        return dict.fromkeys(ids, why)
    headers = {"X-Consul-Token": token} if token else {}
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, trust_env=False) as http:
            response = http.get(f"{config.consul.address}/v1/agent/checks", headers=headers)
    except httpx.HTTPError as exc:
        return dict.fromkeys(ids, f"unknown: Consul {config.consul.address}: {_reason(exc)}")
    if response.status_code != 200:
        why = f"unknown: Consul answered HTTP {response.status_code}"
        return dict.fromkeys(ids, why)
    checks: dict[str, Any] = response.json()
    return {
        sid: str(checks[cid]["Status"]) if cid in checks else "not registered"
        for sid, cid in ids.items()
    }


# ---------------------------------------------------------------------------- status


def _until(timestamp: float, now: float) -> str:
    when = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    left = timestamp - now
    if left <= 0:
        return f"EXPIRED {when}"
    span = f"{left / 86400:.0f} days" if left >= 2 * 86400 else f"{left / 3600:.1f} h"
    return f"{when} ({span} left)"


def _counters(stats: dict[str, Any], name: str) -> list[str]:
    c = stats.get(name, {})
    return [str(c.get("active", 0)), str(c.get("accepted", 0)), str(c.get("failed", 0))]


def print_status(config: AgentConfig, data: dict[str, Any]) -> None:
    from meshagent.agent.registration import service_id
    from meshagent.cli.central import _print_table

    if not data["ready"]:
        typer.echo(f"agent {config.dataplane_name} (mesh {config.mesh}): starting, not ready "
                   f"yet (admin {data['admin']})")
        return
    snapshot, stats = data["snapshot"], data["stats"]
    typer.echo(
        f"agent {config.dataplane_name} (mesh {snapshot['mesh']}): ready, snapshot version "
        f"{snapshot['version']}, mtls {snapshot.get('mtls', 'strict')} (admin {data['admin']})"
    )
    procs = data.get("processes") or {}
    if "serving" in procs:
        restarts = procs.get("worker_restarts", 0)
        note = f", {restarts} worker restart(s): see `worker exited` in the log" if restarts else ""
        typer.echo(f"processes serving the listeners: {procs['serving']}{note}")
    consul = data.get("consul") or {}
    inbound_ids = {(i.service, i.port): service_id(config, i) for i in config.inbound}
    typer.echo("\ninbounds")
    if snapshot.get("inbounds"):
        _print_table(
            ["SERVICE", "LISTEN", "APP", "PROTOCOL", "ACTIVE", "ACCEPTED", "FAILED", "CONSUL"],
            [
                [i["service"], f"{i['bind']}:{i['port']}",
                 f"{i.get('app_host', '127.0.0.1')}:{i['app_port']}", i.get("protocol", "tcp"),
                 *_counters(stats, i["name"]),
                 consul.get(inbound_ids.get((i["service"], i["port"]), ""), "-")]
                for i in snapshot["inbounds"]
            ],
        )
    else:
        typer.echo("  (none)")
    endpoints: dict[str, list[dict[str, Any]]] = snapshot.get("endpoints", {})
    typer.echo("\noutbounds")
    if snapshot.get("outbounds"):
        _print_table(
            ["SERVICE", "LISTEN", "PROTOCOL", "ACTIVE", "ACCEPTED", "FAILED", "ENDPOINTS"],
            [
                [o["service"], f"{o['bind']}:{o['port']}", o.get("protocol", "tcp"),
                 *_counters(stats, o["name"]), str(len(endpoints.get(o["service"], [])))]
                for o in snapshot["outbounds"]
            ],
        )
    else:
        typer.echo("  (none)")
    typer.echo("\nendpoints")
    rows = [
        [service, f"{e['host']}:{e['port']}",
         ",".join(f"{k}={v}" for k, v in e.get("tags", [])) or "-", e.get("node") or "-"]
        for service, items in sorted(endpoints.items())
        for e in items
    ]
    if rows:
        _print_table(["SERVICE", "ENDPOINT", "TAGS", "NODE"], rows)
    else:
        typer.echo("  (none known)")
    typer.echo("\ncertificates")
    now = datetime.now(UTC).timestamp()
    certificates: dict[str, float] = data.get("certificates", {})
    if certificates:
        _print_table(
            ["SERVICE", "VALID UNTIL"],
            [[service, _until(end, now)] for service, end in sorted(certificates.items())],
        )
    else:
        typer.echo("  (none reported)")


def status(
    config: ConfigOption = DEFAULT_CONFIG,
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="FORMAT", help="table or json.")
    ] = "table",
) -> None:
    """Show this host's agent: listeners, endpoints, certificates, snapshot, Consul.

    Reads the running agent's admin endpoint (admin in agent.toml; for a unix socket,
    run as root or as a member of the meshagent group).
    """
    if output not in ("table", "json"):
        _fail(f'--output: "{output}" is not one of: table, json')
    loaded = _load(config)
    if not loaded.admin:
        _fail(f'{config}: admin is "" (off): set admin, e.g. "unix:/run/meshagent/admin.sock", '
              "and restart the agent")
    with AdminClient(loaded.admin) as admin:
        try:
            data = read_agent(admin)
        except AdminUnreachable as exc:
            _fail(f"{exc} (from {config})")
    data["consul"] = consul_checks(loaded) if loaded.consul is not None else None
    if output == "json":
        typer.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        print_status(loaded, data)


# ---------------------------------------------------------------------------- doctor


@dataclass(frozen=True, slots=True)
class Finding:
    """One line of ``meshagent doctor``: a passed check, or a problem and its fix."""

    ok: bool
    check: str
    message: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.check:<12} {self.message}"


def _ok(check: str, message: str) -> Finding:
    return Finding(True, check, message)


def _bad(check: str, message: str) -> Finding:
    return Finding(False, check, message)


def check_config(path: Path) -> tuple[AgentConfig | None, list[Finding]]:
    """Shape and meaning of agent.toml, and the policies it names."""
    from meshagent.config.agent import validate_agent
    from meshagent.config.load import ConfigError, load_toml

    try:
        config = load_toml(path, AgentConfig)
    except ConfigError as exc:
        return None, [_bad("config", str(exc))]
    findings = [_bad("config", f"{path}: {p}") for p in validate_agent(config)]
    if config.policies:
        from meshagent.policy.load import PolicyError, load_paths

        try:
            load_paths([Path(config.policies)])
        except PolicyError as exc:
            findings += [_bad("policies", p) for p in exc.problems]
    return config, findings or [_ok("config", f"{path} is valid")]


def _running_listeners(config: AgentConfig) -> set[tuple[str, int]] | None:
    """(bind, port) of the running agent's listeners, or None when none answers."""
    if not config.admin:
        return None
    try:
        with AdminClient(config.admin) as admin:
            if admin.get("/ready").status_code != 200:
                return None
            snapshot = admin.json("/snapshot")
    except AdminUnreachable:
        return None
    found = {(x["bind"], int(x["port"])) for x in [*snapshot["inbounds"], *snapshot["outbounds"]]}
    if admin_socket_path(config) is None:
        host, _, port = config.admin.rpartition(":")
        found.add((host, int(port)))
    return found


def _try_bind(host: str, port: int) -> OSError | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def check_ports(config: AgentConfig) -> list[Finding]:
    """Every listener can bind, or is held by the running agent itself."""
    wanted = [(f"inbound[{n}].port", config.inbound_bind(i), i.port)
              for n, i in enumerate(config.inbound)]
    wanted += [(f"outbound[{n}].port", o.bind, o.port) for n, o in enumerate(config.outbound)]
    if config.admin and admin_socket_path(config) is None:
        admin_host, _, admin_port = config.admin.rpartition(":")
        if int(admin_port):
            wanted.append(("admin", admin_host, int(admin_port)))
    running = _running_listeners(config)
    findings: list[Finding] = []
    for key, host, port in wanted:
        where = f"{host}:{port} ({key})"
        error = _try_bind(host, port)
        if error is None:
            findings.append(_ok("port", f"{where} is free"))
        elif error.errno == errno.EADDRINUSE and running is not None and (host, port) in running:
            findings.append(_ok("port", f"{where} is held by the running agent"))
        elif error.errno == errno.EADDRINUSE:
            findings.append(_bad("port", f"{where} is in use by another process — fix: find it "
                                 f"with: ss -ltnp 'sport = :{port}', stop it or pick another port"))
        elif error.errno == errno.EACCES:
            findings.append(_bad("port", f"{where}: binding a port below 1024 needs "
                                 "CAP_NET_BIND_SERVICE — fix: uncomment the two capability lines "
                                 "of meshagent.service, or use a port of 1024 or more"))
        elif error.errno == errno.EADDRNOTAVAIL:
            findings.append(_bad("port", f"{where}: {host} is not an address of this host — fix: "
                                 "use one that `ip -brief address` lists"))
        else:
            findings.append(_bad("port", f"{where}: {(error.strerror or str(error)).lower()}"))
    socket_path = admin_socket_path(config)
    if socket_path is not None:
        if running is not None:
            findings.append(_ok("port", f"{config.admin} answers (the running agent)"))
        elif not socket_path.parent.is_dir():
            findings.append(_bad("port", f"{config.admin}: directory {socket_path.parent} does "
                                 "not exist — fix: systemd makes it (RuntimeDirectory=meshagent);"
                                 f" by hand: mkdir -p {socket_path.parent}"))
        else:
            findings.append(_ok("port", f"{config.admin} can be created"))
    return findings


APP_CONNECT_SECONDS = 2.0


def _listening_addresses(port: int) -> list[str]:
    """The addresses (not a wildcard) that this host's TCP sockets, any user's, listen
    on at ``port``."""
    import psutil

    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return []
    return sorted({
        c.laddr.ip for c in connections
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
        and c.laddr.ip not in ("0.0.0.0", "::")
    })


def _connect_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError):
        return f"no answer within {APP_CONNECT_SECONDS:g}s"
    return (exc.strerror or str(exc)).lower()


def check_apps(config: AgentConfig) -> list[Finding]:
    """Every inbound's app accepts connections at ``app_host:app_port``, an address of
    this host (the agent's connection to its app is plaintext)."""
    findings: list[Finding] = []
    for n, inbound in enumerate(config.inbound):
        host, port = inbound.app_host, inbound.app_port
        where = f"{host_port(host, port)} (inbound[{n}], {inbound.service})"
        error = _try_bind(host, 0)
        if error is not None and error.errno == errno.EADDRNOTAVAIL:
            findings.append(_bad("app", f"{where}: {host} is not an address of this host, and "
                                 "the agent's connection to its app is plaintext — fix: run "
                                 "an agent on the app's host, or set app_host to where the app "
                                 "listens here"))
            continue
        try:
            socket.create_connection((host, port), timeout=APP_CONNECT_SECONDS).close()
        except OSError as exc:
            others = [a for a in _listening_addresses(port) if a != host]
            fix = (f'the app listens on {host_port(others[0], port)}: set app_host = "{others[0]}"'
                   if others else "start the app, or fix app_port")
            findings.append(_bad("app", f"{where}: {_connect_error(exc)} — fix: {fix}"))
        else:
            findings.append(_ok("app", f"{where} accepts connections"))
    return findings


def check_consul(config: AgentConfig) -> list[Finding]:
    """GET /v1/agent/self with the ACL token: reachable, and the token accepted."""
    assert config.consul is not None
    address = config.consul.address
    try:
        token = _consul_token(config)
    except OSError as exc:
        return [_bad("consul", f"consul.token_file {config.consul.token_file}: cannot read it "
                     f"({(exc.strerror or str(exc)).lower()}) — fix: run doctor as root or as "
                     "the agent's user, or correct the path")]
    headers = {"X-Consul-Token": token} if token else {}
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, trust_env=False) as http:
            response = http.get(f"{address}/v1/agent/self", headers=headers)
    except httpx.HTTPError as exc:
        return [_bad("consul", f"{address} unreachable ({_reason(exc)}) — fix: start the local "
                     "Consul agent (systemctl start consul) or correct consul.address")]
    if response.status_code == 403:
        what = "refused the ACL token" if token else "needs an ACL token"
        return [_bad("consul", f"{address} {what} (403: {response.text.strip()}) — fix: put a "
                     "token with agent:read, service:write and node:read in consul.token_file")]
    if response.status_code != 200:
        return [_bad("consul", f"{address} answered HTTP {response.status_code} — fix: is "
                     "consul.address the Consul HTTP API (port 8500)?")]
    version = response.json().get("Config", {}).get("Version", "?")
    with_token = "with the ACL token" if token else "without an ACL token"
    return [_ok("consul", f"{address} answers {with_token} (Consul {version})")]


def check_central(config: AgentConfig, *, now: datetime) -> list[Finding]:
    """A TLS connection to each central agent of central.url with central.ca, and the
    clock against the Date header of the first that answers."""
    from meshagent.agent.central_client import central_tls_context

    assert config.central is not None
    try:
        context = central_tls_context(config.central.ca)
    except ValueError as exc:
        return [_bad("central", f"{exc} — fix: copy central-ca.pem from the central agent's "
                     "data_dir")]
    findings: list[Finding] = []
    date: str | None = None
    with httpx.Client(verify=context, timeout=TIMEOUT_SECONDS, trust_env=False) as http:
        for url in config.central.urls:
            finding, answered = _check_one_central(http, url, config.central.ca)
            findings.append(finding)
            date = date or answered
    if date:
        findings.extend(_check_clock(now, date))
    return findings


def _check_one_central(http: httpx.Client, url: str, ca: str) -> tuple[Finding, str | None]:
    """The finding for one central agent, and its Date header when it answered."""
    try:
        response = http.get(f"{url}/v1/")
    except httpx.ConnectError as exc:
        if isinstance(_os_error_of(exc), ssl.SSLError):
            return _bad("central", f"{url}: TLS failed ({_reason(exc)}) — fix: central.ca must "
                        "be that central agent's central-ca.pem, and the URL's host the address "
                        "it listens on or one of its server_names (its certificate names "
                        "them)"), None
        return _bad("central", f"{url} unreachable ({_reason(exc)}) — fix: is meshagent-central "
                    "running there, and its port open to this host?"), None
    except httpx.HTTPError as exc:
        return _bad("central", f"{url}: {_reason(exc)} — fix: is meshagent-central running?"), None
    date = response.headers.get("date")
    return _ok("central", f"{url} answers over TLS, verified with {ca}"), date or ""


def _check_clock(now: datetime, date: str) -> list[Finding]:
    findings: list[Finding] = []
    if date:
        skew = (now - parsedate_to_datetime(date)).total_seconds()
        if abs(skew) > MAX_CLOCK_SKEW_SECONDS:
            side = "ahead of" if skew > 0 else "behind"
            findings.append(_bad("clock", f"this host is {abs(skew):.0f} s {side} the central "
                                 "agent — fix: synchronise clocks (timedatectl set-ntp true, "
                                 "chrony); certificates are checked against them"))
        else:
            findings.append(_ok("clock", f"within {abs(skew):.0f} s of the central agent"))
    return findings


def _private_files(config: AgentConfig) -> Iterator[tuple[str, Path]]:
    """Keys and tokens: (what, path) for each one this config names or makes."""
    if config.tls is not None:
        yield "tls.key", Path(config.tls.key)
    for n, inbound in enumerate(config.inbound):
        if inbound.key:
            yield f"inbound[{n}].key", Path(inbound.key)
    if config.consul is not None and config.consul.token_file:
        yield "consul.token_file", Path(config.consul.token_file)
    if config.central is not None:
        yield "central.token_file", Path(config.central.token_file)
        try:
            names = sorted(p.name for p in config.central_dir.iterdir())
        except OSError:
            names = []
        for name in names:
            if name.endswith((".pem", ".token")) and name != "ca.pem":
                yield f"state_dir/central/{name}", config.central_dir / name


def check_permissions(config: AgentConfig) -> list[Finding]:
    """Keys and tokens are readable by their owner only (0600 or 0400)."""
    findings: list[Finding] = []
    good = 0
    for what, path in _private_files(config):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue  # a missing file is the config's or the join's business
        except OSError as exc:
            findings.append(_bad("permissions", f"{path} ({what}): cannot stat it "
                                 f"({(exc.strerror or str(exc)).lower()}) — fix: run doctor as "
                                 "root or as the agent's user"))
            continue
        if mode & 0o077:
            findings.append(_bad("permissions", f"{path} ({what}) is mode {mode:04o}, readable by "
                                 f"others — fix: chmod 600 {path}"))
        else:
            good += 1
    if good:
        findings.append(_ok("permissions", f"{good} key and token files are private (0600)"))
    return findings


def check_certificates(config: AgentConfig, *, now: datetime) -> list[Finding]:
    """Each identity's certificate: its key, its CA, its dates, its SPIFFE ID."""
    from meshagent.agent.main import identities_of
    from meshagent.pki.files import PkiError, check_identity_files, load_certificate

    findings: list[Finding] = []
    for service, files in sorted(identities_of(config).items()):
        if config.central is not None:
            try:
                Path(files.cert).stat()
            except FileNotFoundError:
                findings.append(_ok("certificate", f"{service}: not joined yet; the agent joins "
                                    "with central.token_file when it starts"))
                continue
            except OSError as exc:
                findings.append(_bad("certificate", f"{files.cert}: cannot read it "
                                     f"({(exc.strerror or str(exc)).lower()}) — fix: run doctor "
                                     "as root or as the agent's user"))
                continue
            try:
                cert = load_certificate(Path(files.cert))
            except PkiError as exc:
                findings.append(_bad("certificate", f"{exc} — fix: run doctor as root or as the "
                                     "agent's user; if it is damaged, remove state_dir/central "
                                     "and join again with a new token"))
                continue
            end = cert.not_valid_after_utc
            if end <= now:
                findings.append(_bad("certificate", f"{service}: {files.cert} expired "
                                     f"{end:%Y-%m-%d %H:%M} UTC — fix: make the central check "
                                     "pass, then systemctl restart meshagent (it renews at start)"))
            else:
                findings.append(_ok("certificate", f"{service}: valid until "
                                    f"{_until(end.timestamp(), now.timestamp())}"))
            continue
        try:
            checked = check_identity_files(Path(files.ca), Path(files.cert), Path(files.key),
                                           mesh=config.mesh, service=service, now=now)
        except PkiError as exc:
            findings.append(_bad("certificate", str(exc)))
            continue
        until = _until(checked.not_after.timestamp(), now.timestamp())
        findings.append(_ok("certificate", f"{service}: {checked.spiffe_id}, valid until {until}"))
    return findings


def check_pump() -> list[Finding]:
    """Whether L4 connections are pumped in C (the agent's CPU per request depends on it)."""
    from meshagent.dataplane.nativepump import ENV_SWITCH, native_problem

    problem = native_problem()
    if problem is None:
        return [_ok("l4 pump", "native: L4 connections are pumped in C")]
    if os.environ.get(ENV_SWITCH) == "0":
        return [_ok("l4 pump", f"python: {problem}")]
    return [_bad("l4 pump", f"python, about 5x the CPU per request: {problem} — fix: install "
                 "gcc and the Python headers (Debian: gcc python3-dev), then reinstall "
                 "meshagent")]


def run_doctor(path: Path, *, now: datetime | None = None) -> list[Finding]:
    """Every check, in the order an operator would fix them."""
    now = now or datetime.now(UTC)
    config, findings = check_config(path)
    if config is None:
        return findings
    findings += check_ports(config)
    findings += check_apps(config)
    if config.consul is not None:
        findings += check_consul(config)
    if config.central is not None:
        findings += check_central(config, now=now)
    findings += check_certificates(config, now=now)
    findings += check_permissions(config)
    findings += check_pump()
    return findings


def doctor(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Check what usually breaks this host's agent, and say how to fix each problem.

    Config, ports, each inbound's app, Consul reachability and ACL token, the central
    agent (TLS with its CA) and the clock against it, certificates, permissions of keys
    and tokens, whether L4 connections are pumped in C. Exit 1 when any check fails.
    Run it as root (or the agent's user) to read keys and tokens.
    """
    findings = run_doctor(config)
    for finding in findings:
        typer.echo(finding.line())
    failed = sum(not f.ok for f in findings)
    if failed:
        typer.echo(f"{failed} problem{'s' if failed > 1 else ''} found", err=True)
        raise typer.Exit(1)
    typer.echo("no problems found")


def register(app: typer.Typer) -> None:
    """Add ``status`` and ``doctor`` to the ``meshagent`` command."""
    app.command(
        "status",
        cls=_Command,
        epilog="Example: meshagent status --config /etc/meshagent/agent.toml -o json",
    )(status)
    app.command(
        "doctor",
        cls=_Command,
        epilog="Example: sudo meshagent doctor --config /etc/meshagent/agent.toml",
    )(doctor)
