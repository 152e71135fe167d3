"""Warn before a certificate expires: provided-CA certificates are not renewed by the
agent, so an operator needs days of notice, in the log, before traffic stops."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio

from meshagent.log import get_logger
from meshagent.pki.files import load_certificate

log = get_logger("certs")

WARN_WITHIN = timedelta(days=7)
CHECK_EVERY_SECONDS = 3600.0


def expiring(
    not_after: Mapping[str, datetime], *, now: datetime, within: timedelta = WARN_WITHIN
) -> dict[str, timedelta]:
    """Services whose certificate ends within ``within`` of ``now``, with the time left
    (negative once expired). Pure."""
    return {s: end - now for s, end in sorted(not_after.items()) if end - now <= within}


def not_after_of(cert_paths: Mapping[str, str]) -> dict[str, datetime]:
    """The expiry of each service's certificate (files already checked at start)."""
    return {
        service: load_certificate(Path(path)).not_valid_after_utc
        for service, path in cert_paths.items()
    }


async def warn_before_expiry(
    cert_paths: Mapping[str, str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Log a warning per certificate within WARN_WITHIN of its end, hourly. A cancel point."""
    not_after = await trio.to_thread.run_sync(not_after_of, dict(cert_paths))
    task_status.started()
    while True:
        for service, left in expiring(not_after, now=datetime.now(UTC)).items():
            hours = left.total_seconds() / 3600
            log.warning(
                "certificate expires soon" if hours > 0 else "certificate expired",
                service=service,
                cert=cert_paths[service],
                hours_left=round(hours, 1),
                fix="meshagent pki issue, then restart the agent",
            )
        await trio.sleep(CHECK_EVERY_SECONDS)
