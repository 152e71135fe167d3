"""meshagent.pumpbuild: compiling the C pump on a host from the source a wheel carries."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from meshagent import pumpbuild


@pytest.fixture
def source(tmp_path: Path) -> Path:
    copy = tmp_path / "_pump.c"
    shutil.copyfile(pumpbuild.SOURCE, copy)
    return copy


def test_builds_once_then_is_up_to_date_until_the_source_changes(source: Path) -> None:
    status, message = pumpbuild.build(source)
    assert (status, message) == ("built", str(pumpbuild.target_path(source)))
    assert pumpbuild._loads(pumpbuild.target_path(source)) is None
    assert pumpbuild.build(source)[0] == "up to date"
    later = pumpbuild.target_path(source).stat().st_mtime + 10
    os.utime(source, (later, later))
    assert pumpbuild.build(source)[0] == "built"
    assert pumpbuild.build(source, force=True)[0] == "built"


def test_a_broken_module_is_rebuilt(source: Path) -> None:
    target = pumpbuild.target_path(source)
    target.write_bytes(b"not a shared object")
    os.utime(source, (0, 0))  # older than the target: only the load check notices
    assert pumpbuild.build(source)[0] == "built"


def test_without_a_compiler_it_says_what_to_install(
    source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    status, message = pumpbuild.build(source)
    assert status == "not built"
    assert message == "no C compiler (/nonexistent/cc not found; Debian: apt install gcc)"
    assert not pumpbuild.target_path(source).exists()


def test_a_compile_error_is_one_line_and_leaves_nothing(source: Path) -> None:
    source.write_text("this is not C\n")
    status, message = pumpbuild.build(source)
    assert status == "not built"
    assert message.count("\n") == 0 and "failed: " in message
    assert not pumpbuild.target_path(source).exists()


def test_missing_source_and_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert pumpbuild.build(tmp_path / "_pump.c")[0] == "not built"
    assert pumpbuild.main(["--bogus"]) == 1
    assert "usage: python -m meshagent.pumpbuild [--force]" in capsys.readouterr().err
