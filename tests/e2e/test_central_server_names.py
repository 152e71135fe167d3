"""``server_names``: clients reach the central agent by a name other than its listen
address (a VIP or DNS name in front of replicas) and verify its certificate.

The central agent listens on 127.0.0.6; a plain TCP forwarder on 127.0.0.5 stands for
the VIP (a load balancer passing TLS through). The agent's client joins through the
VIP; a DNS name is checked with the TLS server name a client would send for it.
Without ``server_names`` the same client refuses the certificate.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from meshagent.agent.central_client import CentralClient, CentralUnavailable, central_tls_context
from meshagent.demo.central import CentralProcess
from meshagent.demo.ports import free_port
from meshagent.pki.csr import make_csr
from meshagent.snapshot.wire import InboundSpec, JoinRequest

VIP = "127.0.0.5"
REPLICA = "127.0.0.6"
DNS_NAME = "central.mesh.example"


@contextmanager
def forwarder(target: tuple[str, int]) -> Iterator[int]:
    """Forward TCP connections on VIP:<port> to ``target`` (threads; closed at exit)."""
    listener = socket.create_server((VIP, free_port(VIP)))
    listener.settimeout(0.2)
    stop = threading.Event()
    lock = threading.Lock()

    def pump(source: socket.socket, sink: socket.socket, ended: list[int]) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        with lock:
            ended.append(1)
            last = len(ended) == 2
        if last:  # both directions ended: close both
            source.close()
            sink.close()

    def serve() -> None:
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(target, timeout=5)
            client.settimeout(None)
            upstream.settimeout(None)
            ended: list[int] = []
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b, ended), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        listener.close()


@pytest.fixture
def named(tmp_path: Path) -> Iterator[CentralProcess]:
    process = CentralProcess(tmp_path, host=REPLICA, server_names=[VIP, DNS_NAME])
    process.start()
    try:
        yield process
    finally:
        process.stop()


def join_request() -> JoinRequest:
    return JoinRequest(
        mesh="shop", dataplane="vm-1", node="vm-1", address="127.0.0.2",
        inbounds=[InboundSpec(service="web", port=15443)],
        csrs={"web": make_csr("shop", "web")[0].decode()},
    )


def server_name_verifies(central: CentralProcess, port: int, server_name: str) -> bool:
    context = ssl.create_default_context(cafile=str(central.ca))
    with socket.create_connection((VIP, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=server_name):
                return True
        except ssl.SSLCertVerificationError:
            return False


async def test_an_agent_reaching_the_central_agent_by_a_server_name_verifies_it(
    named: CentralProcess,
) -> None:
    with named.admin() as admin:
        admin.create_mesh("shop")
        token = admin.join_token("shop", ["web"])
    with forwarder((REPLICA, named.port)) as port:
        async with CentralClient(f"https://{VIP}:{port}", central_tls_context(str(named.ca))) as client:
            joined = await client.join(token, join_request())
            config = await client.config(joined.node_token, "shop", "vm-1", after=0, wait_seconds=0)
        assert config.mesh == "shop"
        assert server_name_verifies(named, port, DNS_NAME)
        assert not server_name_verifies(named, port, "other.mesh.example")


async def test_without_server_names_the_vip_is_refused(tmp_path: Path) -> None:
    plain = CentralProcess(tmp_path, host=REPLICA)
    plain.start()
    try:
        with forwarder((REPLICA, plain.port)) as port:
            async with CentralClient(f"https://{VIP}:{port}", central_tls_context(str(plain.ca))) as client:
                with pytest.raises(CentralUnavailable) as caught:
                    await client.join("ma1_x_y", join_request())
            assert "TLS certificate does not name this URL's host" in str(caught.value)
            assert "server_names" in str(caught.value)
            assert not server_name_verifies(plain, port, DNS_NAME)
    finally:
        plain.stop()
