"""``meshagent demo``: a small mesh on one machine, with traffic and a failure to watch.

Three "hosts" on loopback addresses, each a real ``meshagent run`` process:

    127.0.0.2  web      outbound 127.0.0.1:<port> -> orders
    127.0.0.3  orders   inbound  -> app "orders-a"
    127.0.0.4  orders   inbound  -> app "orders-b"

plus a dev-mode Consul when one is installed (otherwise the web agent gets fixed
endpoints). Steps: balanced traffic; stop the app behind 127.0.0.4 and watch its check
turn critical; traffic again, now only to orders-a. Each step prints what it expects,
and the exit code is 0 only if every step met it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trio

from meshagent.demo.consul import ConsulProcess, find_consul
from meshagent.demo.ports import free_port
from meshagent.demo.processes import Agent, Process, start_app
from meshagent.pki.ca import create_ca, issue_leaf
from meshagent.pki.files import write_private_file, write_public_file

MESH = "demo"
WORKERS = 8
Say = Callable[[str], None]


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    by_app: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.ok + self.failed

    def success_rate(self) -> float:
        return 100.0 * self.ok / self.total if self.total else 0.0

    def line(self, seconds: float) -> str:
        share = "   ".join(
            f"{app} {100.0 * n / max(self.ok, 1):5.1f}%" for app, n in sorted(self.by_app.items())
        )
        return (
            f"  {self.total / max(seconds, 1e-9):7.1f} conn/s   ok {self.success_rate():5.1f}%"
            f"   {share}"
        )


@dataclass
class DemoMesh:
    workdir: Path
    outbound_port: int
    admin_port: int
    consul: ConsulProcess | None = None
    processes: list[Process] = field(default_factory=list)
    apps: dict[str, Process] = field(default_factory=dict)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        if self.consul is not None:
            self.consul.stop()


def _identity(workdir: Path, ca: Any, service: str) -> dict[str, str]:
    leaf = issue_leaf(ca, MESH, service, now=datetime.now(UTC), ttl=timedelta(hours=4))
    cert, key = workdir / f"{service}.pem", workdir / f"{service}-key.pem"
    write_public_file(cert, leaf.cert_pem)
    write_private_file(key, leaf.key_pem)
    return {"ca": str(workdir / "ca.pem"), "cert": str(cert), "key": str(key)}


def start_mesh(workdir: Path, *, use_consul: bool, say: Say) -> DemoMesh:
    """Start Consul (maybe), the apps and the three agents; return once all are ready."""
    ca = create_ca(MESH, now=datetime.now(UTC))
    write_public_file(workdir / "ca.pem", ca.cert_pem)
    mesh = DemoMesh(workdir, outbound_port=free_port(), admin_port=free_port())
    binary = find_consul() if use_consul else None
    common: dict[str, Any] = {"mesh": MESH, "log": {"level": "warning"}, "admin": ""}
    if binary is not None:
        mesh.consul = ConsulProcess(binary=binary, node="demo")
        mesh.consul.start()
        common["consul"] = {"address": mesh.consul.address, "watch_wait": "5s"}
        say(f"  consul      {mesh.consul.address} (dev mode, pid {mesh.consul.pid})")
    else:
        why = "--no-consul" if not use_consul else "not installed (scripts/install-consul.sh)"
        say(f"  consul      {why}: the web agent uses fixed endpoints")
    inbound_ports: list[str] = []
    for name, address in (("orders-a", "127.0.0.3"), ("orders-b", "127.0.0.4")):
        app, app_port = start_app("reply", workdir, name=name)
        mesh.processes.append(app)
        mesh.apps[name] = app
        port = free_port(address)
        inbound_ports.append(f"{address}:{port}")
        config = {
            **common,
            "node": f"host-{address}",
            "address": address,
            "tls": _identity(workdir, ca, "orders"),
            "inbound": [
                {
                    "service": "orders",
                    "port": port,
                    "app_port": app_port,
                    "tags": {"version": "v1"},
                    "health": {"tcp": True, "interval": "1s"},
                }
            ],
        }
        agent = Agent(config, workdir, f"agent-{name}")
        mesh.processes.append(agent)
        agent.wait_for("READY=1")
        say(
            f"  {address:<11} agent pid {agent.pid:<7} inbound orders :{port} "
            f"-> app {name} on 127.0.0.1:{app_port}"
        )
    outbound: dict[str, Any] = {"service": "orders", "port": mesh.outbound_port, "source": "web"}
    if mesh.consul is None:
        outbound["endpoints"] = inbound_ports
    web = Agent(
        {
            **common,
            "node": "host-127.0.0.2",
            "address": "127.0.0.2",
            "tls": _identity(workdir, ca, "web"),
            "outbound": [outbound],
            "admin": f"127.0.0.1:{mesh.admin_port}",
        },
        workdir,
        "agent-web",
    )
    mesh.processes.append(web)
    web.wait_for("READY=1")
    say(
        f"  127.0.0.2   agent pid {web.pid:<7} outbound 127.0.0.1:{mesh.outbound_port} "
        f"-> orders (mTLS as spiffe://{MESH}/service/web)"
    )
    return mesh


async def _one_request(port: int, tally: Tally) -> None:
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"order #1")
                await stream.send_eof()
                answer = b""
                while data := await stream.receive_some(4096):
                    answer += data
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        answer = b""
    app, _, rest = answer.decode(errors="replace").partition(" got ")
    if rest == "8":
        tally.ok += 1
        tally.by_app[app] += 1
    else:
        tally.failed += 1


async def _requests(port: int, count: int) -> Tally:
    tally = Tally()
    for _ in range(count):
        await _one_request(port, tally)
    return tally


async def drive_traffic(port: int, seconds: float, say: Say) -> Tally:
    """``WORKERS`` clients in a loop for ``seconds``; print a line per second."""
    tally = Tally()
    start = trio.current_time()
    end = start + seconds

    async def worker() -> None:
        while trio.current_time() < end:
            await _one_request(port, tally)

    async def report() -> None:
        while True:
            await trio.sleep(1)
            say(tally.line(trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(report)
        async with trio.open_nursery() as workers:
            for _ in range(WORKERS):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    say(tally.line(trio.current_time() - start) + "   (step total)")
    return tally


def _healthy(consul: ConsulProcess) -> list[str]:
    import json
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"{consul.address}/v1/health/service/orders?passing=1"
    with opener.open(url, timeout=5) as response:
        return [e["Service"]["Address"] for e in json.loads(response.read())]


def run_steps(mesh: DemoMesh, duration: float, say: Say) -> bool:
    """The walkthrough; True if every step met what it printed."""
    step = max(1.0, duration * 0.4)
    met = True
    say(f"\nstep 1: web calls orders for {step:.0f} s — expect 100% success on both hosts")
    tally = trio.run(drive_traffic, mesh.outbound_port, step, say)
    ok = tally.failed == 0 and tally.ok > 0 and set(tally.by_app) == {"orders-a", "orders-b"}
    say(f"  -> {'met' if ok else 'NOT met'}")
    met &= ok

    if mesh.consul is None:
        say("\nstep 2: (skipped: health checks need Consul)")
        return met
    say("\nstep 2: stop the app behind 127.0.0.4 — expect its Consul check to turn critical")
    mesh.apps["orders-b"].stop()
    began = time.monotonic()
    while time.monotonic() - began < 15 and "127.0.0.4" in _healthy(mesh.consul):
        time.sleep(0.1)
    ok = "127.0.0.4" not in _healthy(mesh.consul)
    say(f"  orders on 127.0.0.4 critical after {time.monotonic() - began:.1f} s")
    say(f"  -> {'met' if ok else 'NOT met'}")
    met &= ok
    # The web agent hears of it through its blocking query; wait (bounded) until five
    # requests in a row land on orders-a before measuring.
    began = time.monotonic()
    while time.monotonic() - began < 15:
        probe = trio.run(_requests, mesh.outbound_port, 5)
        if probe.ok == 5 and set(probe.by_app) == {"orders-a"}:
            break
    say(f"  the web agent routes around it after {time.monotonic() - began:.1f} s")

    say(f"\nstep 3: web calls orders for {step:.0f} s — expect 100% success, all on orders-a")
    tally = trio.run(drive_traffic, mesh.outbound_port, step, say)
    ok = tally.failed == 0 and tally.ok > 0 and set(tally.by_app) == {"orders-a"}
    say(f"  -> {'met' if ok else 'NOT met'}")
    return met and ok


def run_demo(*, duration: float, keep_running: bool, use_consul: bool, say: Say) -> int:
    """Run the demo; returns the process exit code. Leaves no process or file behind."""
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-demo-"))
    say(f"meshagent demo: mesh {MESH!r}, CA and configs in {workdir}")
    mesh: DemoMesh | None = None
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


def _keep_running(mesh: DemoMesh, say: Say) -> None:
    port = mesh.outbound_port
    say("\nthe mesh stays up until Ctrl-C. Try:")
    say(
        "  python3 -c \"import socket; s=socket.create_connection(('127.0.0.1',"
        f" {port})); s.sendall(b'hi'); s.shutdown(1); print(s.recv(99))\""
    )
    say(f"  configs and logs: {mesh.workdir}/*.toml, {mesh.workdir}/*.log")
    say(f"  curl -s 127.0.0.1:{mesh.admin_port}/metrics   (the web agent; also /stats, /snapshot)")
    if mesh.consul is not None:
        say(f"  curl -s {mesh.consul.address}/v1/health/service/orders")
    while True:
        time.sleep(3600)
