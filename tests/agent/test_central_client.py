"""CentralClient over several central agents (``[central] url`` as a list): a real
``meshagent central`` process and ports where nothing listens, on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meshagent.agent.central_client import (
    CentralClient,
    CentralRefused,
    CentralUnavailable,
    central_tls_context,
)
from meshagent.demo.central import CentralProcess
from meshagent.demo.ports import free_port
from meshagent.pki.csr import make_csr
from meshagent.snapshot.wire import InboundSpec, JoinRequest, StatusReport


@pytest.fixture(scope="module")
def central(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CentralProcess]:
    process = CentralProcess(tmp_path_factory.mktemp("central"))
    process.start()
    try:
        with process.admin() as admin:
            admin.create_mesh("shop")
        yield process
    finally:
        process.stop()


def nobody() -> str:
    """A URL where nothing listens (a stopped replica)."""
    return f"https://127.0.0.1:{free_port()}"


def join_request(name: str) -> JoinRequest:
    return JoinRequest(
        mesh="shop", dataplane=name, node=name, address="127.0.0.2",
        inbounds=[InboundSpec(service="web", port=15443)],
        csrs={"web": make_csr("shop", "web")[0].decode()},
    )


async def test_a_dead_replica_is_skipped_and_the_one_that_answers_sticks(
    central: CentralProcess,
) -> None:
    with central.admin() as admin:
        token = admin.join_token("shop", ["web"])
    dead = nobody()
    async with CentralClient([dead, central.url + "/"], central_tls_context(str(central.ca))) as client:
        assert client.urls == (dead, central.url) and client.url == dead
        joined = await client.join(token, join_request("vm-1"))
        assert client.url == central.url  # in use from now on
        config = await client.config(joined.node_token, "shop", "vm-1", after=0, wait_seconds=0)
        assert config.mesh == "shop"
        await client.report(joined.node_token, "shop", "vm-1", StatusReport(applied_version=1))
        assert client.url == central.url


async def test_a_refusal_is_not_tried_on_other_replicas(central: CentralProcess) -> None:
    tls = central_tls_context(str(central.ca))
    async with CentralClient([central.url, nobody()], tls) as client:
        with pytest.raises(CentralRefused) as refused:
            await client.join("ma1_nope_secret", join_request("vm-2"))
        assert refused.value.status == 401 and client.url == central.url


async def test_when_none_answers_the_error_names_the_field_and_every_url(
    central: CentralProcess,
) -> None:
    tls = central_tls_context(str(central.ca))
    first, second = nobody(), nobody()
    async with CentralClient([first, second], tls) as client:
        with pytest.raises(CentralUnavailable) as caught:
            await client.report("ma1_x_y", "shop", "vm-1", StatusReport(applied_version=1))
    message = str(caught.value)
    assert message.startswith("none of the 2 central agents of central.url answered: ")
    assert f"central agent {first}: cannot connect" in message
    assert f"central agent {second}: cannot connect" in message
    assert "\n" not in message
    # One URL: the error is that URL's, as before.
    async with CentralClient(first, tls) as single:
        with pytest.raises(CentralUnavailable) as one:
            await single.report("ma1_x_y", "shop", "vm-1", StatusReport(applied_version=1))
    assert str(one.value).startswith(f"central agent {first}: cannot connect")
    with pytest.raises(ValueError, match=r"central\.url"):
        CentralClient([], tls)
