"""A real Consul agent in dev mode on 127.0.0.1, for the demo and integration tests.

``ConsulProcess`` picks free ports for everything it listens on (DNS and gRPC are off),
keeps its data in a temporary directory, and can be stopped and started again on the
same HTTP port (dev mode keeps its state in memory, so a restart loses every
registration: exactly the "Consul restarted" case the agent must survive).

``start()`` and ``stop()`` block (they wait for the process); from a trio test call
them as ``await trio.to_thread.run_sync(consul.stop)``.

The binary: ``$MESHAGENT_CONSUL_BIN``, else ``consul`` on PATH, else whatever
``scripts/install-consul.sh`` installs (Consul 1.8.7 from Debian bullseye, cached).

The tests' fixture is ``consul`` in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from meshagent.demo.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0

_binary_cache: list[str] = []


def find_consul() -> str | None:
    """An installed consul binary, without installing one: $MESHAGENT_CONSUL_BIN, PATH,
    or the cache scripts/install-consul.sh fills (~/.cache/meshagent)."""
    path = os.environ.get("MESHAGENT_CONSUL_BIN") or shutil.which("consul")
    if path and os.access(path, os.X_OK):
        return path
    cache = Path(os.environ.get("MESHAGENT_CACHE", Path.home() / ".cache" / "meshagent"))
    cached = cache / "consul" / "usr" / "bin" / "consul"
    return str(cached) if os.access(cached, os.X_OK) else None


def consul_binary() -> str:
    """Path of the consul binary to run (installs it once if needed).

    Raises:
        RuntimeError: no binary and the installer failed (one line, with its last words).
    """
    if _binary_cache:
        return _binary_cache[0]
    path = find_consul()
    if not path:
        script = REPO_ROOT / "scripts" / "install-consul.sh"
        done = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=300, check=False
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"{script} failed (exit {done.returncode}): {last}")
        path = lines[-1]
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"consul binary {path} is not executable")
    _binary_cache.append(path)
    return path


class ConsulProcess:
    """One ``consul agent -dev`` bound to 127.0.0.1.

    Args:
        acl_master_token: enable ACLs (default policy deny) with this master token.
        node: the Consul node name.
        hcl: more agent settings, one HCL snippet each (e.g. ``'session_ttl_min = "1s"'``
            so leader elections can use short sessions in tests).
    """

    def __init__(
        self,
        *,
        acl_master_token: str | None = None,
        node: str = "meshtest",
        binary: str | None = None,
        hcl: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.hcl = tuple(hcl)
        self.acl_master_token = acl_master_token
        self.node = node
        self.http_port = free_port()
        self._other_ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._data_dir: Path | None = None
        self._log_path: Path | None = None
        self._started_once = False

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start Consul (again, on the same HTTP port) and wait until it has a leader.

        Raises:
            RuntimeError: Consul exited or had no leader within START_TIMEOUT_SECONDS.
        """
        if self.is_running():
            return
        last_error = ""
        for _ in range(3):  # a picked port may be taken by someone else meanwhile
            self._launch()
            try:
                self._wait_for_leader()
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop()
                self._other_ports = {}  # pick fresh serf/server ports next time
                if not self._started_once:
                    self.http_port = free_port()  # a restart must keep its HTTP port
            else:
                self._started_once = True
                return
        raise RuntimeError(last_error)

    def stop(self) -> None:
        """Terminate Consul (SIGTERM, then SIGKILL after STOP_TIMEOUT_SECONDS) and wait."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def log_tail(self, lines: int = 20) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return "\n".join(self._log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- internals ---------------------------------------------------------------------

    def _launch(self) -> None:
        if not self._other_ports:
            self._other_ports = {
                "server": free_port(),
                "serf-lan": free_port(),
                "serf-wan": free_port(),
            }
        self._data_dir = Path(tempfile.mkdtemp(prefix="meshagent-consul-"))
        self._log_path = self._data_dir / "consul.log"
        args = [
            self.binary or consul_binary(),
            "agent",
            "-dev",
            f"-node={self.node}",
            "-bind=127.0.0.1",
            "-client=127.0.0.1",
            f"-http-port={self.http_port}",
            "-dns-port=-1",
            "-grpc-port=-1",
            f"-server-port={self._other_ports['server']}",
            f"-serf-lan-port={self._other_ports['serf-lan']}",
            f"-serf-wan-port={self._other_ports['serf-wan']}",
            f"-data-dir={self._data_dir / 'data'}",
            "-log-level=warn",
            "-hcl=disable_update_check = true",
        ]
        args += [f"-hcl={snippet}" for snippet in self.hcl]
        if self.acl_master_token:
            args.append(
                '-hcl=acl { enabled = true, default_policy = "deny", '
                f'tokens {{ master = "{self.acl_master_token}" }} }}'
            )
        with open(self._log_path, "wb") as log:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def _wait_for_leader(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        url = f"{self.address}/v1/status/leader"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no $http_proxy
        while time.monotonic() < deadline:
            if not self.is_running():
                raise RuntimeError(f"consul exited at start: {self.log_tail(5)}")
            with contextlib.suppress(OSError, ValueError):
                with opener.open(url, timeout=1.0) as response:
                    leader = json.loads(response.read())
                if leader:
                    return
            time.sleep(0.05)  # poll interval of a bounded wait, not a synchronisation
        raise RuntimeError(
            f"consul at {self.address} had no leader within {START_TIMEOUT_SECONDS:g}s: "
            f"{self.log_tail(5)}"
        )
