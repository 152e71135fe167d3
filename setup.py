"""The C part of meshagent: the L4 byte pump (meshagent/_pump.c).

Everything else is declared in pyproject.toml. The extension is optional: where it
cannot be built (no C compiler), meshagent installs without it and pumps L4
connections in Python (slower, same behaviour); `meshagent doctor` says which is used.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "meshagent._pump",
            sources=["meshagent/_pump.c"],
            libraries=["dl"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
            optional=True,
        )
    ]
)
