#!/usr/bin/env python3
"""Build meshagent's wheel from a source directory, on the controller.

Usage: build_wheel.py SOURCE_DIR OUT_DIR  -> prints the wheel's path.

The source is copied to a scratch directory first (without .git, virtualenvs and
build output), so stale files under SOURCE_DIR/build never reach the wheel and the
source tree is left as it was. SOURCE_DATE_EPOCH makes the wheel byte-for-byte
reproducible: the same source gives the same checksum, so copying it to a host
changes nothing on a second run. The wheel is pure Python and carries the C pump's
source; the role compiles it on each host.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__",
    ".*_cache", ".hypothesis", ".tox", ".nox", "*.so",
)


def main(source: Path, out: Path) -> int:
    if not (source / "pyproject.toml").is_file():
        print(f"error: {source}: no pyproject.toml; meshagent_package_source must be "
              "meshagent's source directory, a .whl file or a pip requirement", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    # Pure Python (MESHAGENT_PURE_WHEEL): the controller's platform and Python need not
    # be the hosts'; the role compiles the C pump on each host (meshagent.pumpbuild).
    env = {**os.environ, "SOURCE_DATE_EPOCH": "315532800", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "MESHAGENT_PURE_WHEEL": "1"}
    with tempfile.TemporaryDirectory(prefix="meshagent-build-") as scratch:
        tree = Path(scratch) / "src"
        shutil.copytree(source, tree, ignore=IGNORE, symlinks=True)
        wheels = Path(scratch) / "wheels"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(tree)],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
            print(f"error: pip wheel {source} failed: {tail[0]}", file=sys.stderr)
            return 1
        (built,) = wheels.glob("meshagent-*.whl")
        target = out / built.name
        if not target.exists() or target.read_bytes() != built.read_bytes():
            shutil.copyfile(built, target)
    print(target)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: build_wheel.py SOURCE_DIR OUT_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1]).expanduser().resolve(), Path(sys.argv[2]).expanduser()))
