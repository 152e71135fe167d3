"""``meshagent demo``: a legacy monolith strangled, on one machine, in a minute.

What runs (every part a real process, on loopback "hosts")::

    central     meshagent central (SQLite in a temporary directory), mesh "shop"
    consul      a dev-mode Consul when one is installed, else the central agent's
                inventory is the catalog
    127.0.0.2   agent: inbound monolith -> the legacy app; outbound "front door"
                127.0.0.1:<port> -> monolith (the traffic generator calls it)
    127.0.0.3   agent: inbound orders (version v1) -> the new orders service
    127.0.0.4   agent: inbound orders (version v2) -> its next version

Steps, each printing what it expects and then what it saw (a line per second):

1. no route yet: every request reaches the monolith
2. the strangler route: /orders goes to the new service, v1 90 %, v2 10 %
3. the canary at 50 %
4. the canary at 100 %
5. the mesh goes from permissive to strict mTLS: nothing fails

The exit code is 0 only if every step met what it printed. Ctrl-C (or the end) stops
every process it started, by pid, and removes the temporary directory.
"""

from __future__ import annotations

import math
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from meshagent.demo.central import AdminClient, CentralProcess
from meshagent.demo.consul import ConsulProcess, find_consul
from meshagent.demo.ports import free_port
from meshagent.demo.processes import Agent, Process
from meshagent.demo.traffic import Tally, drive

MESH = "shop"
STEPS = 5
Say = Callable[[str], None]

PERMISSIONS = """\
[[TrafficPermission]]
name = "front-door-to-monolith"
mesh = "shop"
sources = ["monolith"]
destination = "monolith"

[[TrafficPermission]]
name = "monolith-to-orders"
mesh = "shop"
sources = ["monolith"]
destination = "orders"
"""

ROUTE = """
[[TrafficRoute]]
name = "strangle-orders"
mesh = "shop"
source = "*"
destination = "monolith"          # what callers address: the monolith

  [[TrafficRoute.rule]]           # /orders is peeled off to the new service
  match = {{ path_prefix = "/orders" }}
  split = [ {{ service = "orders", tags = {{ version = "v1" }}, weight = {v1} }},
            {{ service = "orders", tags = {{ version = "v2" }}, weight = {v2} }} ]

  [TrafficRoute.default]          # everything else stays on the monolith
  split = [ {{ service = "monolith", weight = 100 }} ]
"""


def policies(v2_percent: int | None) -> str:
    """The policy document of a step: permissions, and the route unless None."""
    if v2_percent is None:
        return PERMISSIONS
    if v2_percent in (0, 100):  # one subset takes all: the other is left out
        return PERMISSIONS + _one_subset("v2" if v2_percent == 100 else "v1")
    return PERMISSIONS + ROUTE.format(v1=100 - v2_percent, v2=v2_percent)


def _one_subset(version: str) -> str:
    return f"""
[[TrafficRoute]]
name = "strangle-orders"
mesh = "shop"
source = "*"
destination = "monolith"

  [[TrafficRoute.rule]]
  match = {{ path_prefix = "/orders" }}
  split = [ {{ service = "orders", tags = {{ version = "{version}" }}, weight = 100 }} ]

  [TrafficRoute.default]
  split = [ {{ service = "monolith", weight = 100 }} ]
"""


@dataclass
class MigrationMesh:
    workdir: Path
    central: CentralProcess
    front_port: int
    monolith_inbound: int = 0
    consul: ConsulProcess | None = None
    processes: list[Process] = field(default_factory=list)
    admin_ports: dict[str, int] = field(default_factory=dict)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.central.stop()
        if self.consul is not None:
            self.consul.stop()


def _start_app(workdir: Path, app: str, version: str) -> tuple[Process, int]:
    import socket
    import sys

    port = free_port()
    process = Process(
        [sys.executable, "-m", "meshagent.demo.legacy", app, "--version", version,
         "--port", str(port)],
        workdir / f"app-{app}-{version}.log",
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            if process.proc.poll() is not None:
                raise RuntimeError(f"app {app} exited: {process.output()}") from None
            time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"app {app} did not listen on {port} within 10 s")


def start_mesh(workdir: Path, *, use_consul: bool, say: Say) -> MigrationMesh:
    """Start the central agent, Consul (maybe), the apps and the three agents."""
    central = CentralProcess(workdir)
    mesh = MigrationMesh(workdir, central, front_port=free_port())
    central.start()
    say(f"  central     {central.url} (SQLite in {central.data}, pid {central.process.pid})"
        if central.process else "")
    binary = find_consul() if use_consul else None
    if binary is not None:
        mesh.consul = ConsulProcess(binary=binary, node="demo")
        mesh.consul.start()
        say(f"  consul      {mesh.consul.address} (dev mode, pid {mesh.consul.pid})")
    else:
        why = "--no-consul" if not use_consul else "not installed (scripts/install-consul.sh)"
        say(f"  consul      {why}: the central agent's inventory is the catalog")
    with central.admin() as admin:
        admin.create_mesh(MESH, mtls="permissive", default_allow=False)
        admin.apply(MESH, policies(None))
        say(f"  mesh        {MESH}: permissive mTLS, only what a TrafficPermission allows")
        hosts = [
            ("monolith", "127.0.0.2", "monolith", "legacy"),
            ("orders-v1", "127.0.0.3", "orders", "v1"),
            ("orders-v2", "127.0.0.4", "orders", "v2"),
        ]
        agents: list[tuple[Agent, str]] = []
        for name, address, service, version in hosts:
            app, app_port = _start_app(workdir, service, "v2" if version == "v2" else "v1")
            mesh.processes.append(app)
            inbound_port = free_port(address)
            config = _agent_config(mesh, admin, name, address, service)
            config["inbound"] = [{
                "service": service, "port": inbound_port, "app_port": app_port,
                "protocol": "http", "tags": {"version": version},
                "health": {"http": "/healthz", "interval": "1s"},
            }]
            what = f"inbound {service} ({version}) :{inbound_port} -> app on :{app_port}"
            if service == "monolith":
                mesh.monolith_inbound = inbound_port
                config["outbound"] = [{
                    "service": "monolith", "port": mesh.front_port, "protocol": "http",
                    "source": "monolith",
                }]
                what += f"; front door 127.0.0.1:{mesh.front_port}"
            agent = Agent(config, workdir, f"agent-{name}")
            mesh.processes.append(agent)
            agents.append((agent, f"  {address:<11} agent pid {agent.pid:<7} {what}"))
        for agent, line in agents:
            agent.wait_for("READY=1", timeout=30)
            say(line)
    return mesh


def _agent_config(
    mesh: MigrationMesh, admin: AdminClient, name: str, address: str, service: str
) -> dict[str, Any]:
    token_file = mesh.workdir / f"{name}.join-token"
    token_file.write_text(admin.join_token(MESH, [service]) + "\n")
    admin_port = free_port()
    mesh.admin_ports[name] = admin_port
    config: dict[str, Any] = {
        "mesh": MESH,
        "node": name,
        "address": address,
        "state_dir": str(mesh.workdir / f"{name}-state"),
        "admin": f"127.0.0.1:{admin_port}",
        "central": {
            "url": mesh.central.url,
            "ca": str(mesh.central.ca),
            "token_file": str(token_file),
        },
        "log": {"level": "warning", "access": "off"},
    }
    if mesh.consul is not None:
        config["consul"] = {"address": mesh.consul.address, "watch_wait": "5s"}
    return config


# ---------------------------------------------------------------------------- the steps


def share_ok(tally: Tally, path: str, server: str, expected: float) -> bool:
    """Is ``server``'s share of ``path`` what ``expected`` says (exact at 0 and 1,
    within four standard deviations, and at least 4 points, in between)?"""
    n = sum(tally.served[path].values())
    share = tally.share(path, server)
    if expected in (0.0, 1.0):
        return n > 0 and share == expected
    margin = max(0.04, 4 * math.sqrt(expected * (1 - expected) / max(n, 1)))
    return n > 0 and abs(share - expected) <= margin


def wait_applied(admin: AdminClient, say: Say, *, within: float = 20.0) -> bool:
    """Wait (bounded) until every dataplane runs the mesh's latest config."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        dataplanes = admin.dataplanes(MESH)
        if dataplanes and all(
            d["applied_version"] == d["latest_version"] for d in dataplanes
        ):
            version = dataplanes[0]["latest_version"]
            say(f"  {len(dataplanes)} agents run config version {version} "
                f"({time.monotonic() - began:.1f} s after the change)")
            return True
        time.sleep(0.1)
    say(f"  agents did not all apply the change within {within:g} s")
    return False


def wait_answering(port: int, *, within: float = 30.0) -> bool:
    """Wait (bounded) until the front door answers 5 requests in a row."""
    began = time.monotonic()
    while time.monotonic() - began < within:
        tally = trio.run(drive, port, 0.3, None)
        if tally.failed == 0 and tally.ok >= 5:
            return True
        time.sleep(0.2)
    return False


def plaintext_answers(port: int) -> bool:
    """Does the monolith's inbound answer plain HTTP (a caller outside the mesh)?"""
    import socket

    try:
        with socket.create_connection(("127.0.0.2", port), timeout=3) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: monolith\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _step(title: str, say: Say) -> None:
    say(f"\n{title}")


def _verdict(ok: bool, say: Say) -> bool:
    say(f"  -> {'met' if ok else 'NOT met'}")
    return ok


def run_steps(mesh: MigrationMesh, duration: float, say: Say) -> bool:
    """The walkthrough; True if every step met what it printed."""
    seconds = max(1.0, duration / STEPS)
    port = mesh.front_port
    met = True
    if not wait_answering(port):
        say("  the front door did not answer within 30 s (see the agents' logs)")
        return False
    with mesh.central.admin() as admin:
        _step(f"step 1: no route yet, {seconds:.0f} s of traffic — expect every answer "
              "from the monolith, 100% ok", say)
        tally = trio.run(drive, port, seconds, say)
        met &= _verdict(
            tally.failed == 0
            and share_ok(tally, "orders", "monolith legacy", 1.0)
            and share_ok(tally, "users", "monolith legacy", 1.0),
            say,
        )
        for number, percent in ((2, 10), (3, 50), (4, 100)):
            if percent == 10:
                title = ("step 2: apply the strangler route — expect /orders on the new "
                         "service (v1 90%, v2 10%), /users still on the monolith")
            else:
                title = f"step {number}: move the canary to {percent}% — expect v2 at {percent}%"
            _step(title, say)
            admin.apply(MESH, policies(percent))
            met &= wait_applied(admin, say)
            tally = trio.run(drive, port, seconds, say)
            met &= _verdict(
                tally.failed == 0
                and share_ok(tally, "users", "monolith legacy", 1.0)
                and share_ok(tally, "orders", "orders v2", percent / 100)
                and share_ok(tally, "orders", "orders v1", 1 - percent / 100),
                say,
            )
        _step("step 5: switch the mesh from permissive to strict mTLS — expect no failed "
              "request, and a legacy caller that skips the mesh refused", say)
        inbound = mesh.monolith_inbound
        before = plaintext_answers(inbound)
        say(f"  plain HTTP straight to the monolith's inbound (127.0.0.2:{inbound}): "
            f"{'answered' if before else 'refused'} (permissive)")
        admin.set_mesh(MESH, mtls="strict")
        met &= wait_applied(admin, say)
        tally = trio.run(drive, port, seconds, say)
        after = plaintext_answers(inbound)
        say(f"  plain HTTP straight to the monolith's inbound: "
            f"{'answered' if after else 'refused'} (strict)")
        met &= _verdict(tally.failed == 0 and tally.ok > 0 and before and not after, say)
    return met


def run_demo(*, duration: float, keep_running: bool, use_consul: bool, say: Say) -> int:
    """Run the demo; returns the exit code. Leaves no process or file behind."""
    _stop_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-demo-"))
    say(f"meshagent demo: strangling a monolith in mesh {MESH!r}; configs and logs in {workdir}")
    mesh: MigrationMesh | None = None
    try:
        mesh = start_mesh(workdir, use_consul=use_consul, say=say)
        met = run_steps(mesh, duration, say)
        say("\nresult: " + ("every step met its expectation" if met else "a step was NOT met"))
        if keep_running:
            _keep_running(mesh, say)
        return 0 if met else 1
    except KeyboardInterrupt:
        say("\ninterrupted")
        return 130
    finally:
        say("stopping every process of the demo")
        if mesh is not None:
            mesh.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (a closed terminal) stop the demo as Ctrl-C does: every
    process it started is stopped, none is left behind. SIGINT is set too: a shell
    starts a background job (`meshagent demo --keep-running &`) with SIGINT ignored,
    and Python then leaves it ignored; `kill -INT` must still stop the demo."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _keep_running(mesh: MigrationMesh, say: Say) -> None:
    central = mesh.central
    say("\nthe mesh stays up until Ctrl-C. Try:")
    say(f"  curl -s 127.0.0.1:{mesh.front_port}/orders/7     # the new service (v2)")
    say(f"  curl -s 127.0.0.1:{mesh.front_port}/users/7      # still the monolith")
    say(f"  python3 -m meshagent.demo.traffic --port {mesh.front_port} --seconds 10")
    say(f"  export MESHAGENT_CENTRAL={central.url} MESHAGENT_CENTRAL_CA={central.ca} "
        f"MESHAGENT_TOKEN_FILE={central.data / 'admin.token'}")
    say("  meshagent get dataplanes --mesh shop")
    say("  meshagent apply -f examples/migration/policies.toml   # back to the 90/10 canary")
    say(f"  curl -s 127.0.0.1:{mesh.admin_ports['monolith']}/metrics   # the front door's agent")
    say(f"  configs and logs: {mesh.workdir}")
    while True:
        time.sleep(3600)
