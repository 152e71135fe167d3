"""sd_notify for the agent: ``notify`` (READY=1, STOPPING=1) and the ``watchdog`` task.

Both live in ``meshagent/systemd.py``, which the central agent uses too (it may not
import ``agent``); this module keeps the agent's imports where they were."""

from __future__ import annotations

from meshagent.systemd import notify, watchdog, watchdog_interval

__all__ = ["notify", "watchdog", "watchdog_interval"]
