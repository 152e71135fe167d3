"""``meshagent central`` as a child process, and a small admin client for it: for the
demo, the benchmarks and end-to-end tests (operators use the ``meshagent`` CLI)."""

from __future__ import annotations

import signal
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from meshagent.demo.ports import free_port
from meshagent.demo.processes import Process


class CentralProcess:
    """A central agent on a free loopback port, its data under ``directory``."""

    def __init__(self, directory: Path, *, cert_ttl: str = "24h", name: str = "central") -> None:
        self.directory = directory
        self.name = name
        self.port = free_port()
        self.data = directory / f"{name}-data"
        self.config = directory / f"{name}.toml"
        self.config.write_text(
            f'listen = "127.0.0.1:{self.port}"\ndata_dir = "{self.data}"\n'
            f'cert_ttl = "{cert_ttl}"\n[log]\nlevel = "debug"\n'
        )
        self.process: Process | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.data / "central-ca.pem"

    @property
    def admin_token(self) -> str:
        return (self.data / "admin.token").read_text().strip()

    def start(self, timeout: float = 20) -> None:
        """Start it and wait (bounded) until it accepts connections."""
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
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not listen within {timeout:g} s")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        return self.process.stop(sig)

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
