"""Log routing: the access log can go to its own file, or nowhere."""

from __future__ import annotations

import io
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshagent import log


@pytest.fixture(autouse=True)
def restore() -> Iterator[None]:
    yield
    log.configure()
    log._Settings.stream = None


def test_a_routed_logger_writes_to_its_own_file(tmp_path: Path) -> None:
    main = io.StringIO()
    log._Settings.stream = main
    path = tmp_path / "access.log"
    access = log.open_log_file(str(path))
    log.configure(routes={"access": access}, mesh="shop")
    log.get_logger("access").info("request", path="/a b")
    log.get_logger("agent").info("ready")
    access.close()
    line = path.read_text().strip()
    assert "logger=access" in line and 'path="/a b"' in line and "mesh=shop" in line
    assert "logger=access" not in main.getvalue() and "logger=agent" in main.getvalue()
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_off_drops_the_lines_and_says_so_to_callers() -> None:
    main = io.StringIO()
    log._Settings.stream = main
    log.configure(routes={"access": None})
    access = log.get_logger("access")
    assert not access.enabled("info")
    access.info("request")
    assert main.getvalue() == ""
    assert log.get_logger("agent").enabled("info")
