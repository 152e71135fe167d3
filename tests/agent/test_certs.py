"""Expiry warnings: which certificates, and when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshagent.agent.certs import expiring, not_after_of
from tests.support.pki import make_ca

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("left", "warned"),
    [(timedelta(days=30), False), (timedelta(days=7, seconds=1), False),
     (timedelta(days=7), True), (timedelta(hours=1), True), (timedelta(hours=-1), True)],
)
def test_expiring_within_seven_days(left: timedelta, warned: bool) -> None:
    result = expiring({"web": NOW + left}, now=NOW)
    assert (result == {"web": left}) if warned else (result == {})


def test_not_after_is_read_from_the_certificate(tmp_path: Path) -> None:
    files = make_ca(tmp_path, "shop").issue("web")
    end = not_after_of({"web": files.cert})["web"]
    assert timedelta(minutes=55) < end - datetime.now(UTC) <= timedelta(hours=1)
