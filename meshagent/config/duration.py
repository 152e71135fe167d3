"""Durations written as text with a unit: "250ms", "5s", "15m", "24h", "3650d"."""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Parse a duration such as "1.5s" or "720h".

    Args:
        text: a non-negative number (decimals allowed) immediately followed by one
            unit out of ``ms``, ``s``, ``m``, ``h``, ``d``. No sign, no spaces.

    Returns:
        The duration in seconds.

    Raises:
        ValueError: the text is empty, negative, has no (or an unknown) unit, or
            is too large to represent.
    """
    match = _DURATION.fullmatch(text)
    seconds = float(match[1]) * _UNIT_SECONDS[match[2]] if match else math.nan
    if not math.isfinite(seconds):
        raise ValueError(
            f'invalid duration "{text}": use a number with a unit, e.g. "5s", "250ms", "24h"'
        )
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as a duration string ``parse_duration`` reads back ("0.025s", "5s");
    millisecond resolution."""
    text = f"{seconds:.3f}".rstrip("0").rstrip(".")
    return f"{text}s"
