"""parse_duration: text with a unit to seconds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshagent.config.duration import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("15m", 900.0),
        ("0.5m", 30.0),
        ("24h", 86400.0),
        ("720h", 30 * 86400.0),
        ("3650d", 3650 * 86400.0),
    ],
)
def test_parses(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5",
        "-5s",
        "+5s",
        "5 s",
        " 5s",
        "5s ",
        "5S",
        "5sec",
        "s",
        "1.s",
        ".5s",
        "5us",
        "1e3s",
        "5s5m",
        "inf",
        "nans",
        "9" * 400 + "d",
    ],
)
def test_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_error_message_says_what_to_write() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("x")
    assert str(info.value) == (
        'invalid duration "x": use a number with a unit, e.g. "5s", "250ms", "24h"'
    )


@given(
    number=st.integers(min_value=0, max_value=10**9),
    unit=st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)]),
)
def test_integers_with_any_unit(number: int, unit: tuple[str, float]) -> None:
    suffix, factor = unit
    assert parse_duration(f"{number}{suffix}") == pytest.approx(number * factor)
