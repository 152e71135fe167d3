"""``meshagent central`` as a child process, and a small admin client for it: for the
demo, the benchmarks and end-to-end tests (operators use the ``meshagent`` CLI).

Replicas: ``CentralProcess(..., store=ConsulStore(address), secrets_from=first)`` is
one more central agent on the same Consul KV store as ``first``. It starts with a
copy of ``first``'s seal key and central CA (``seed_replica``), as an operator copies
them to every replica: the seal key opens the mesh CA keys in the store, and one
central CA lets agents and the CLI trust every replica with one ``central-ca.pem``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx

from meshagent.central.tls import CA_CERT_FILE, CA_KEY_FILE
from meshagent.config.central import SEAL_KEY_FILE
from meshagent.demo.ports import free_port
from meshagent.demo.processes import Process

# What replicas of one central agent share, in each one's data_dir (the server
# certificate and admin.token are each replica's own).
REPLICA_SHARED_FILES: Final = (SEAL_KEY_FILE, CA_CERT_FILE, CA_KEY_FILE)


@dataclass(frozen=True, slots=True)
class ConsulStore:
    """``[store] kind = "consul"`` of central.toml (durations as TOML strings)."""

    address: str
    prefix: str = "meshagent/"
    session_ttl: str = "10s"
    lock_delay: str = "1s"

    def toml(self) -> str:
        return (
            f'[store]\nkind = "consul"\naddress = "{self.address}"\nprefix = "{self.prefix}"\n'
            f'session_ttl = "{self.session_ttl}"\nlock_delay = "{self.lock_delay}"\n'
        )


def seed_replica(source_data: Path, target_data: Path) -> None:
    """Copy what replicas share (``REPLICA_SHARED_FILES``) from one data directory into
    a new one (made 0700; keys stay 0600). Files already there are kept.

    Raises:
        RuntimeError: ``source_data`` lacks one of them (start that replica first).
    """
    target_data.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in REPLICA_SHARED_FILES:
        source, target = source_data / name, target_data / name
        if target.exists():
            continue
        if not source.exists():
            raise RuntimeError(f"seed replica: {source} missing; start the first replica first")
        shutil.copyfile(source, target)
        os.chmod(target, os.stat(source).st_mode & 0o777)


class CentralProcess:
    """A central agent on a free loopback port, its data under ``directory``.

    Args:
        cert_ttl: lifetime of the certificates it signs.
        name: names its files in ``directory`` (``<name>.toml``, ``<name>-data``, logs).
        store: a Consul KV store (replicas); default SQLite in its data directory.
        secrets_from: a replica (started once) whose seal key and central CA this one
            starts with.
        leader_jobs_interval: central.toml ``leader_jobs_interval`` (default: its own).
        heartbeat_interval: central.toml ``heartbeat_interval`` (default: its own).
        ca_rotation_spread: central.toml ``ca_rotation_spread`` (default: its own).
        host: the loopback address it listens on.
        server_names: central.toml ``server_names`` (more names for its certificate).
    """

    def __init__(
        self,
        directory: Path,
        *,
        cert_ttl: str = "24h",
        name: str = "central",
        store: ConsulStore | None = None,
        secrets_from: CentralProcess | None = None,
        leader_jobs_interval: str | None = None,
        heartbeat_interval: str | None = None,
        ca_rotation_spread: str | None = None,
        host: str = "127.0.0.1",
        server_names: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        self.host = host
        self.port = free_port(host)
        self.data = directory / f"{name}-data"
        self.config = directory / f"{name}.toml"
        self.secrets_from = secrets_from
        jobs = f'leader_jobs_interval = "{leader_jobs_interval}"\n' if leader_jobs_interval else ""
        if heartbeat_interval:
            jobs += f'heartbeat_interval = "{heartbeat_interval}"\n'
        if ca_rotation_spread:
            jobs += f'ca_rotation_spread = "{ca_rotation_spread}"\n'
        if server_names is not None:
            jobs += "server_names = [" + ", ".join(f'"{n}"' for n in server_names) + "]\n"
        self.config.write_text(
            f'listen = "{host}:{self.port}"\ndata_dir = "{self.data}"\n'
            f'cert_ttl = "{cert_ttl}"\n{jobs}{store.toml() if store else ""}'
            '[log]\nlevel = "debug"\n'
        )
        self.process: Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.data / "central-ca.pem"

    @property
    def admin_token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def output(self) -> str:
        """What the current (or last) run logged; "" before the first start."""
        return self.process.output() if self.process is not None else ""

    def start(self, timeout: float = 20) -> None:
        """Start it and wait (bounded) until it accepts connections."""
        if self.secrets_from is not None:
            seed_replica(self.secrets_from.data, self.data)
        self.starts += 1
        self.process = Process(
            [sys.executable, "-m", "meshagent", "central", "--config", str(self.config)],
            self.directory / f"{self.name}-{self.starts}.log",
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.process.output()}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout:g} s")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        return self.process.stop(sig)

    def kill(self) -> int:
        """SIGKILL by pid: no clean stop (the leader key is not given up)."""
        return self.stop(signal.SIGKILL)

    def admin(self) -> AdminClient:
        return AdminClient(self.url, self.ca, self.admin_token)


class AdminClient:
    """Blocking calls to the admin API; a non-2xx answer raises RuntimeError(its error)."""

    def __init__(self, url: str, ca: Path, token: str) -> None:
        self._http = httpx.Client(
            base_url=url,
            verify=ssl.create_default_context(cafile=str(ca)),
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
            trust_env=False,
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if not response.is_success:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text}")
        return response.json()

    def create_mesh(self, name: str, **settings: Any) -> Any:
        return self.call("POST", "/v1/meshes", json={"name": name, **settings})

    def set_mesh(self, name: str, **settings: Any) -> Any:
        return self.call("PATCH", f"/v1/meshes/{name}", json=settings)

    def join_token(self, mesh: str, services: list[str], *, uses: int = 1) -> str:
        answer = self.call(
            "POST", f"/v1/meshes/{mesh}/tokens", json={"services": services, "uses": uses}
        )
        token: str = answer["token"]
        return token

    def apply(self, mesh: str, toml_text: str) -> Any:
        return self.call(
            "PUT",
            f"/v1/meshes/{mesh}/policies",
            content=toml_text.encode(),
            headers={"Content-Type": "application/toml"},
        )

    def dataplanes(self, mesh: str) -> list[dict[str, Any]]:
        answer = self.call("GET", f"/v1/meshes/{mesh}/dataplanes")
        items: list[dict[str, Any]] = answer["dataplanes"]
        return items
