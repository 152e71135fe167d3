"""What ``compare.py`` runs: the tools it needs (installed when missing and allowed),
the upstream, and each path a request can take to it, every process started here
stopped by pid.

Not a script: ``compare.py`` imports it.

Paths (all on loopback; the load always enters at 127.0.0.1):

    direct          load -> upstream
    meshagent L4    load -> web agent, tcp outbound -> mTLS -> orders agent, tcp inbound -> upstream
    meshagent HTTP  the same with protocol = "http" on both listeners (pooled mTLS)
    haproxy         load -> haproxy (mode http) -> mTLS -> haproxy (mode http) -> upstream
    consul          load -> consul connect proxy (upstream listener) -> mTLS
                         -> consul connect proxy (sidecar public listener) -> upstream

Every peer uses EC P-256 keys: meshagent and HAProxy the same certificates, issued by
the mesh CA of ``common.write_identities`` (the code behind ``meshagent pki``); Consul's
proxies take their leaf certificates from Consul's own built-in CA (Connect does not
take outside leaf certificates), whose keys are EC P-256 too by default.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    LOOPBACK,
    ORDERS_ADDRESS,
    Setup,
    SetupError,
    agent_configs,
    read_line,
    start_agents,
    stop_process,
    tail,
)

from meshagent.demo.consul import ConsulProcess, consul_binary
from meshagent.demo.ports import free_port
from meshagent.demo.processes import Process

HERE = Path(__file__).resolve().parent
APT_PACKAGES = {"nginx": "nginx-light", "haproxy": "haproxy", "wrk": "wrk"}
SMALL_BODY = "s" * 100
START_SECONDS = 20.0

Stopper = Callable[[], object]


# --------------------------------------------------------------------------------------
# Tools


@dataclass
class Tools:
    """Binaries found (path) or why not (``missing[name]``), and their versions."""

    paths: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _version(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


def apt_install(packages: list[str], log: Path) -> str | None:
    """``apt-get update`` once, then install ``packages`` without starting their
    services; None on success, else the reason (one line). Output goes to ``log``."""
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install it"
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Debian's maintainer scripts would start nginx and haproxy as system services
    # (nginx on port 80 of every address); a policy-rc.d that says 101 forbids it.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# compare.py: no services start now\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    try:
        with open(log, "ab") as out:
            for args, timeout in (
                (["apt-get", "update"], 300),
                (["apt-get", "install", "-y", "--no-install-recommends", *packages], 600),
            ):
                print(f"  running: {' '.join(args)}", flush=True)
                try:
                    done = subprocess.run(
                        args, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                        check=False,
                    )
                except subprocess.TimeoutExpired:
                    return f"{' '.join(args[:2])} took more than {timeout} s"
                if done.returncode != 0:
                    last = tail(log, 1)
                    return f"{' '.join(args[:2])} failed ({done.returncode}): {' '.join(last)}"
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    return None


def find_tools(install: bool, tmp: Path) -> Tools:
    """nginx, haproxy, wrk (apt-get install when missing and ``install``) and consul
    (``scripts/install-consul.sh`` when missing, which honours MESHAGENT_CONSUL_DEB)."""
    tools = Tools()
    for name in APT_PACKAGES:
        path = _which(name)
        if path:
            tools.paths[name] = path
    absent = [APT_PACKAGES[n] for n in APT_PACKAGES if n not in tools.paths]
    if absent and install:
        print(f"installing {' '.join(absent)} (apt-get)", flush=True)
        problem = apt_install(absent, tmp / "apt.log")
        if problem is not None:
            tools.notes.append(f"apt-get: {problem}")
        for name in APT_PACKAGES:
            path = _which(name)
            if path and name not in tools.paths:
                tools.paths[name] = path
    for name, package in APT_PACKAGES.items():
        if name not in tools.paths:
            how = (
                "its install failed (see above)"
                if install
                else f"this run does not install packages (apt-get install {package}, or run "
                "without --smoke / with --install)"
            )
            tools.missing[name] = f"{name} not installed; {how}"
    try:
        tools.paths["consul"] = consul_binary()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        tools.missing["consul"] = f"no consul binary: {exc}"
    if "nginx" in tools.paths:
        tools.versions["nginx"] = _version([tools.paths["nginx"], "-v"]).replace(
            "nginx version: ", ""
        )
    if "haproxy" in tools.paths:
        tools.versions["haproxy"] = " ".join(_version([tools.paths["haproxy"], "-v"]).split()[:3])
    if "wrk" in tools.paths:
        tools.versions["wrk"] = " ".join(_version([tools.paths["wrk"], "-v"]).split()[:2])
    if "consul" in tools.paths:
        tools.versions["consul"] = _version([tools.paths["consul"], "version"])
    return tools


# --------------------------------------------------------------------------------------
# Helpers


def wait_listening(port: int, proc: Process, what: str, host: str = LOOPBACK) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            if proc.proc.poll() is not None:
                code = proc.proc.returncode
                raise SetupError(f"{what} exited ({code})", tail(proc.log_path)) from None
            time.sleep(0.05)
    raise SetupError(f"{what} did not listen on {host}:{port} within {START_SECONDS:g} s",
                     tail(proc.log_path))


def get_small(port: int, timeout: float = 5.0) -> str | None:
    """One ``GET /small`` on a new connection: None if the 100-byte body came back,
    else what went wrong."""
    request = b"GET /small HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" " or body != SMALL_BODY.encode():
        return f"unexpected answer {data[:80]!r}"
    return None


def wait_get_small(port: int, what: str, logs: list[Path], seconds: float = START_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    problem: str | None = "not tried"
    while time.monotonic() < deadline:
        problem = get_small(port)
        if problem is None:
            return
        time.sleep(0.2)
    details = [f"{log.name}: {line}" for log in logs for line in tail(log, 6)]
    raise SetupError(f"a request through {what} failed: {problem}", details)


# --------------------------------------------------------------------------------------
# The upstream


@dataclass
class Upstream:
    kind: str  # what it is, for the report
    port: int
    pid: int


def start_upstream(
    tools: Tools, tmp: Path, bulk_bytes: int, nofile: int, stops: list[Stopper]
) -> Upstream:
    """nginx (one worker, no master) serving /small and /bulk, or the stand-in."""
    if "nginx" in tools.paths:
        root = tmp / "nginx"
        (root / "www").mkdir(parents=True)
        with open(root / "www" / "bulk", "wb") as f:
            block = b"b" * (1 << 20)
            left = bulk_bytes
            while left > 0:
                f.write(block[: min(left, len(block))])
                left -= len(block)
        port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(
            f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections {max(1024, nofile - 64)}; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 3600s;
    keepalive_requests 100000000;
    client_body_temp_path {root}/body;
    server {{
        listen {LOOPBACK}:{port} backlog=4096;
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY}"; }}
        location = /closing {{
            keepalive_requests 1;
            default_type text/plain;
            return 200 "{SMALL_BODY}";
        }}
        location / {{ root {root}/www; }}
    }}
}}
"""
        )
        proc = Process([tools.paths["nginx"], "-p", str(root), "-e", str(root / "error.log"),
                        "-c", str(conf)], root / "stdout.log")
        stops.append(proc.stop)
        wait_listening(port, proc, "nginx")
        wait_get_small(port, "nginx", [root / "error.log", root / "stdout.log"], 5)
        version = tools.versions.get("nginx", "nginx")
        return Upstream(f"{version} (nginx-light, one worker)", port, proc.pid)
    proc_log = tmp / "upstream.log"
    with open(proc_log, "ab") as log:
        popen = subprocess.Popen(
            [sys.executable, str(HERE / "upstream.py"), "--bulk-bytes", str(bulk_bytes)],
            stdout=subprocess.PIPE, stderr=log,
        )
    stops.append(lambda: stop_process(popen))
    words = read_line(popen, 10).split()
    if len(words) != 2 or words[0] != b"READY":
        raise SetupError("bench/upstream.py did not start within 10 s", tail(proc_log))
    port = int(words[1])
    wait_get_small(port, "bench/upstream.py", [proc_log], 5)
    return Upstream("bench/upstream.py, the Python stand-in (nginx not installed)", port,
                    popen.pid)


# --------------------------------------------------------------------------------------
# Paths


@dataclass
class PathUnderTest:
    """One way to the upstream: where the load goes, and the processes whose CPU and
    memory are its cost (``proxies``; ``control``: helpers it needs besides, such as
    Consul's agent, reported apart)."""

    name: str
    port: int = 0
    proxies: dict[str, int] = field(default_factory=dict)
    control: dict[str, int] = field(default_factory=dict)
    not_run: str | None = None
    notes: list[str] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)  # a meshagent pair's agent logs
    # a meshagent pair: the same pair started again with this many processes per agent
    with_workers: Callable[[int], PathUnderTest] | None = None
    workers: int = 1  # processes per agent (a meshagent pair)


def start_meshagent_pair(
    name: str,
    protocol: str | None,
    tls: dict[str, dict[str, str]],
    tmp: Path,
    upstream: Upstream,
    max_connections: int,
    stops: list[Stopper],
    workers: int = 1,
) -> PathUnderTest:
    """Start a pair; ``workers``: processes per agent (each holds its share of the
    connections, and of the descriptors they need)."""
    setup = Setup(tmp)
    stops.append(setup.stop)
    inbound_port = free_port(ORDERS_ADDRESS)
    outbound_port = free_port(LOOPBACK)
    configs = agent_configs(
        tls, inbound_port=inbound_port, outbound_port=outbound_port, app_port=upstream.port,
        protocol=protocol, max_connections=max_connections, workers=workers,
    )
    prefix = ("l4" if protocol is None else "http") + ("" if workers == 1 else f"-w{workers}")
    start_agents(setup, {f"{prefix}-{k}": v for k, v in configs.items()})
    wait_get_small(outbound_port, name, [a.log_path for a in setup.agents], 10)
    pids = {a.name: a.pid for a in setup.agents}
    logs = {a.name: a.log_path for a in setup.agents}
    return PathUnderTest(
        name, outbound_port, proxies=pids, logs=logs, workers=workers,
        with_workers=lambda count: start_meshagent_pair(
            name, protocol, tls, tmp, upstream, max_connections, stops, count),
    )


def _pem_bundle(tls: dict[str, str], out: Path) -> Path:
    out.write_bytes(Path(tls["cert"]).read_bytes() + Path(tls["key"]).read_bytes())
    out.chmod(0o600)
    return out


def start_haproxy_pair(
    tools: Tools,
    tls: dict[str, dict[str, str]],
    tmp: Path,
    upstream: Upstream,
    maxconn: int,
    stops: list[Stopper],
) -> PathUnderTest:
    """Two HAProxy processes in ``mode http``, one thread each, mTLS between them (both
    verify the other against the mesh CA), keep-alive on every hop (its defaults:
    ``http-reuse safe``, TLS sessions resumed towards the server)."""
    root = tmp / "haproxy"
    root.mkdir()
    front_port = free_port(LOOPBACK)
    back_port = free_port(ORDERS_ADDRESS)
    web = _pem_bundle(tls["web"], root / "web.pem")
    orders = _pem_bundle(tls["orders"], root / "orders.pem")
    ca = tls["web"]["ca"]
    common = f"""global
    nbthread 1
    maxconn {maxconn}
    no strict-limits
    ssl-default-bind-options ssl-min-ver TLSv1.2
    ssl-default-server-options ssl-min-ver TLSv1.2
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout server 3600s
    timeout http-keep-alive 3600s
    timeout http-request 30s
"""
    configs = {
        "haproxy-web": common
        + f"""frontend outbound
    bind {LOOPBACK}:{front_port}
    default_backend orders
backend orders
    server orders {ORDERS_ADDRESS}:{back_port} ssl crt {web} ca-file {ca} verify required
""",
        "haproxy-orders": common
        + f"""frontend inbound
    bind {ORDERS_ADDRESS}:{back_port} ssl crt {orders} ca-file {ca} verify required
    default_backend app
backend app
    server app {LOOPBACK}:{upstream.port}
""",
    }
    procs: dict[str, Process] = {}
    for name in ("haproxy-orders", "haproxy-web"):
        conf = root / f"{name}.cfg"
        conf.write_text(configs[name])
        proc = Process([tools.paths["haproxy"], "-db", "-f", str(conf)], root / f"{name}.log")
        stops.append(proc.stop)
        procs[name] = proc
    wait_listening(back_port, procs["haproxy-orders"], "haproxy (orders side)", ORDERS_ADDRESS)
    wait_listening(front_port, procs["haproxy-web"], "haproxy (web side)")
    wait_get_small(front_port, "the haproxy pair", [p.log_path for p in procs.values()], 10)
    return PathUnderTest(
        "haproxy pair", front_port, proxies={n: p.pid for n, p in procs.items()}
    )


def _consul_api(consul: ConsulProcess, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{consul.address}{path}", data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=5) as response:
        text = response.read()
    return json.loads(text) if text else None


def start_consul_pair(
    tools: Tools, tmp: Path, upstream: Upstream, stops: list[Stopper]
) -> PathUnderTest:
    """A dev-mode Consul agent (Connect on, its built-in CA), the services ``orders``
    (the upstream) and ``web``, each registered with a sidecar proxy; ``web``'s sidecar
    has ``orders`` as upstream on a local port. Two ``consul connect proxy
    -sidecar-for`` processes run the sidecars."""
    root = tmp / "consul"
    root.mkdir()
    consul = ConsulProcess(node="bench", binary=tools.paths["consul"])
    stops.append(consul.stop)
    consul.start()
    assert consul.pid is not None
    upstream_port = free_port(LOOPBACK)
    orders_public = free_port(LOOPBACK)
    web_public = free_port(LOOPBACK)
    bind = {"bind_address": LOOPBACK, "local_service_address": LOOPBACK}

    def sidecar(port: int, upstreams: list[dict[str, Any]]) -> dict[str, Any]:
        # A 1 s TCP check instead of the default 10 s one, so the upstream side sees
        # the orders sidecar healthy soon after it listens.
        return {
            "Port": port,
            "Address": LOOPBACK,
            "Proxy": {"Config": bind, "Upstreams": upstreams},
            "Checks": [{"Name": "listening", "TCP": f"{LOOPBACK}:{port}", "Interval": "1s"}],
        }

    _consul_api(consul, "PUT", "/v1/agent/service/register", {
        "ID": "orders", "Name": "orders", "Address": LOOPBACK, "Port": upstream.port,
        "Connect": {"SidecarService": sidecar(orders_public, [])},
    })
    _consul_api(consul, "PUT", "/v1/agent/service/register", {
        "ID": "web", "Name": "web", "Address": LOOPBACK, "Port": free_port(LOOPBACK),
        "Connect": {"SidecarService": sidecar(web_public, [{
            "DestinationName": "orders", "LocalBindAddress": LOOPBACK,
            "LocalBindPort": upstream_port,
        }])},
    })
    procs: dict[str, Process] = {}
    for service in ("orders", "web"):
        proc = Process(
            [tools.paths["consul"], "connect", "proxy", "-sidecar-for", service,
             f"-http-addr={LOOPBACK}:{consul.http_port}", "-log-level=warn"],
            root / f"proxy-{service}.log",
        )
        stops.append(proc.stop)
        procs[f"consul-proxy-{service}"] = proc
    wait_listening(orders_public, procs["consul-proxy-orders"], "consul connect proxy (orders)")
    wait_listening(upstream_port, procs["consul-proxy-web"], "consul connect proxy (web)")
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if _consul_api(consul, "GET", "/v1/health/connect/orders?passing=1"):
                break
        time.sleep(0.2)
    wait_get_small(upstream_port, "the consul proxy pair",
                   [p.log_path for p in procs.values()], START_SECONDS)
    return PathUnderTest(
        "consul pair",
        upstream_port,
        proxies={n: p.pid for n, p in procs.items()},
        control={"consul-agent": consul.pid},
        notes=["certificates from Consul's built-in CA (EC P-256)"],
    )
