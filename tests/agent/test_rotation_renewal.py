"""``keep_certificates_fresh`` during a CA rotation, under a mock clock: a fake central
agent that signs with a real CA, real files in tmp_path, no network.

The clock jumps only after every task has waited 200 ms of real time (not at once, as
``autojump_clock`` does), because the renewer reads files and makes keys in worker
threads, and an instant jump would move time while a thread works."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import trio
from trio.testing import MockClock

from meshagent.agent.central import (
    Joined,
    Status,
    _save_join,
    certificate_issuers,
    keep_certificates_fresh,
)
from meshagent.agent.central_client import CentralClient
from meshagent.pki.ca import PemPair, create_ca
from meshagent.pki.csr import make_csr, sign_csr
from meshagent.pki.rotation import ca_fingerprint
from meshagent.snapshot.wire import Certificates, DataplaneConfig, RenewRequest

SPREAD = 30.0
JUMP_AFTER_SECONDS = 0.2


@dataclass
class FakeCentral:
    """Signs renewals with ``ca``; the bundle it answers is ``bundle``."""

    ca: PemPair
    bundle: str
    renewed_at: list[float] = field(default_factory=list)

    async def renew(
        self, node_token: str, mesh: str, dataplane: str, request: RenewRequest
    ) -> Certificates:
        self.renewed_at.append(trio.current_time())
        now = datetime.now(UTC)
        certificates = {
            service: sign_csr(
                self.ca, csr.encode(), mesh=mesh, allowed_services=[service], now=now,
                ttl=timedelta(hours=1),
            )[1].decode()
            for service, csr in request.csrs.items()
        }
        return Certificates(certificates=certificates, ca_bundle=self.bundle)


def joined_with(tmp_path: Path, ca: PemPair) -> Joined:
    joined = Joined(
        directory=tmp_path / "central", url="https://c", mesh="shop", dataplane="vm-1",
        identities=["web"], node_token="t", ca_bundle=ca.cert_pem.decode(),
    )
    csr, key = make_csr("shop", "web")
    _, cert = sign_csr(
        ca, csr, mesh="shop", allowed_services=["web"], now=datetime.now(UTC),
        ttl=timedelta(hours=1),
    )
    _save_join(joined, {"web": cert.decode()}, {"web": (csr, key)})
    return joined


async def test_a_rotation_renews_within_the_spread_then_not_again(
    tmp_path: Path, mock_clock: MockClock
) -> None:
    mock_clock.autojump_threshold = JUMP_AFTER_SECONDS
    old, new = create_ca("shop", now=datetime.now(UTC)), create_ca("shop", now=datetime.now(UTC))
    joined = joined_with(tmp_path, old)
    both = (new.cert_pem + old.cert_pem).decode()
    central = FakeCentral(new, both)
    status = Status()
    swaps: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: keep_certificates_fresh(
                cast(CentralClient, central), joined, lambda: swaps.append(0.0), status,
                rng=random.Random(1), task_status=task_status,
            )
        )
        assert status.cert_issuers == [ca_fingerprint(old.cert_pem)]
        await trio.sleep(600)  # no rotation: a 1 h certificate is not due
        assert central.renewed_at == []

        # The config of a rotation arrives (as follow_config applies it).
        joined.ca_bundle = both
        seen_at = trio.current_time()
        joined.signing.update(
            DataplaneConfig(
                version=2, mesh="shop", ca_bundle=both,
                signing_ca=ca_fingerprint(new.cert_pem), rotation_spread_seconds=SPREAD,
            )
        )
        await trio.sleep(SPREAD + 1)
        assert len(central.renewed_at) == 1 and len(swaps) == 1
        assert 0 <= central.renewed_at[0] - seen_at <= SPREAD
        assert certificate_issuers(joined) == [ca_fingerprint(new.cert_pem)]
        assert status.cert_issuers == [ca_fingerprint(new.cert_pem)]

        await trio.sleep(600)  # on the signing CA now: nothing more to do
        assert len(central.renewed_at) == 1
        nursery.cancel_scope.cancel()


async def test_the_delays_of_many_agents_spread_over_the_window(
    tmp_path: Path, mock_clock: MockClock
) -> None:
    mock_clock.autojump_threshold = JUMP_AFTER_SECONDS
    old, new = create_ca("shop", now=datetime.now(UTC)), create_ca("shop", now=datetime.now(UTC))
    both = (new.cert_pem + old.cert_pem).decode()
    central = FakeCentral(new, both)
    config = DataplaneConfig(
        version=2, mesh="shop", ca_bundle=both, signing_ca=ca_fingerprint(new.cert_pem),
        rotation_spread_seconds=SPREAD,
    )
    async with trio.open_nursery() as nursery:
        agents = []
        for n in range(20):
            joined = joined_with(tmp_path / f"agent-{n}", old)
            joined.ca_bundle = both
            agents.append(joined)
            await nursery.start(
                lambda task_status, j=joined, n=n: keep_certificates_fresh(
                    cast(CentralClient, central), j, lambda: None, Status(),
                    rng=random.Random(n), task_status=task_status,
                )
            )
        start = trio.current_time()
        for joined in agents:
            joined.signing.update(config)
        await trio.sleep(SPREAD + 1)
        nursery.cancel_scope.cancel()
    offsets = sorted(t - start for t in central.renewed_at)
    assert len(offsets) == 20 and offsets[0] >= 0 and offsets[-1] <= SPREAD
    assert offsets[-1] - offsets[0] > SPREAD / 2  # not a stampede
