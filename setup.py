"""The C part of meshagent: the L4 byte pump (meshagent/dataplane/_pump.c).

Everything else is declared in pyproject.toml. The extension is optional: where it
cannot be built (no C compiler or Python headers), meshagent installs without it and
pumps L4 connections in Python (same behaviour, about 5x the CPU per small request);
`meshagent doctor` says which pump a host has.

MESHAGENT_PURE_WHEEL=1 builds a pure-Python wheel that installs on any host (the
ansible roles build one on the controller); `python -m meshagent.pumpbuild` then
compiles the pump on each host from the C source the wheel carries.
"""

import os

from setuptools import Extension, setup

PUMP = Extension(
    "meshagent.dataplane._pump",
    sources=["meshagent/dataplane/_pump.c"],
    libraries=["dl"],
    # -g0: no debug info, so the same source builds the same bytes in any directory.
    extra_compile_args=["-O2", "-g0", "-Wall", "-Wextra", "-std=gnu11"],
    optional=True,
)

setup(ext_modules=[] if os.environ.get("MESHAGENT_PURE_WHEEL") == "1" else [PUMP])
