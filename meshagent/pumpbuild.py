"""Build the C pump (``meshagent/dataplane/_pump.c``) for this host's Python, in
place.

    python -m meshagent.pumpbuild [--force]

``pip install`` from the source builds it already (where a C compiler is). A wheel
built elsewhere, such as the one the ansible roles build on the controller, is pure
Python so that it installs on any host; the roles then run this on each host. It needs
a C compiler and the Python headers (Debian: ``gcc python3-dev``); without them the
agent pumps L4 connections in Python, and ``meshagent doctor`` says so.

Prints one line and exits 0: ``built ...``, ``up to date ...`` or ``not built: <why>``
(so a role can tell a change from none); exits 1 only on bad usage.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Literal

Status = Literal["built", "up to date", "not built"]

SOURCE = Path(__file__).parent / "dataplane" / "_pump.c"


def target_path(source: Path = SOURCE) -> Path:
    """Where Python imports the module from: ``_pump`` plus this Python's suffix."""
    return source.with_name("_pump" + str(sysconfig.get_config_var("EXT_SUFFIX")))


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed command said last: the line an operator needs."""
    lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
    return lines[-1]


def _loads(path: Path) -> str | None:
    """None if ``path`` imports as the pump in a fresh interpreter, else why not."""
    code = (
        "import importlib.util, sys\n"
        "name = 'meshagent.dataplane._pump'\n"
        "spec = importlib.util.spec_from_file_location(name, sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "engine = module.Engine()\n"
        "engine.stop()\n"
        "engine.serve()  # returns at once: stopped\n"
        "assert engine.collect() == [] and engine.active() == 0\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    return None if result.returncode == 0 else _last_line(result)


def build(source: Path = SOURCE, *, force: bool = False) -> tuple[Status, str]:
    """Compile ``source`` next to itself. Returns (status, one line for the operator)."""
    target = target_path(source)
    if not source.is_file():
        return "not built", f"{source} is missing (a meshagent install without its C source)"
    if (
        not force
        and target.is_file()
        and target.stat().st_mtime >= source.stat().st_mtime
        and _loads(target) is None
    ):
        return "up to date", str(target)
    compiler = shlex.split(os.environ.get("CC") or str(sysconfig.get_config_var("CC") or "cc"))
    if not compiler or shutil.which(compiler[0]) is None:
        name = compiler[0] if compiler else "cc"
        return "not built", f"no C compiler ({name} not found; Debian: apt install gcc)"
    include = Path(sysconfig.get_paths()["include"])
    if not (include / "Python.h").is_file():
        return "not built", (
            f"no Python headers ({include}/Python.h; Debian: apt install python3-dev)"
        )
    with tempfile.TemporaryDirectory(prefix="meshagent-pump-") as scratch:
        built = Path(scratch) / target.name
        command = [
            *compiler, "-shared", "-fPIC", "-O2", "-g0", "-std=gnu11", f"-I{include}",
            str(source), "-o", str(built), "-ldl",
        ]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=300, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return "not built", f"{compiler[0]} failed: {exc}"
        if result.returncode != 0:
            return "not built", f"{compiler[0]} failed: {_last_line(result)}"
        problem = _loads(built)
        if problem is not None:
            return "not built", f"the built module does not load: {problem}"
        staged = target.with_name(target.name + ".new")
        try:
            shutil.copyfile(built, staged)
            os.chmod(staged, 0o644)
            os.replace(staged, target)  # atomic: a running agent keeps its old copy
        except OSError as exc:
            staged.unlink(missing_ok=True)
            return "not built", f"cannot write {target}: {exc.strerror or exc}"
    return "built", str(target)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--force"]):
        print("usage: python -m meshagent.pumpbuild [--force]", file=sys.stderr)
        return 1
    status, message = build(force=args == ["--force"])
    print(f"{status}: {message}" if status == "not built" else f"{status} {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
