"""Shared fixtures. pytest-trio runs every async test (trio_mode in pyproject.toml)."""

from tests.support.consul import consul  # noqa: F401  (a real Consul in dev mode)
