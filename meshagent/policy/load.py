"""Read policy documents (TOML or JSON) into resources, reporting every problem.

Each problem is one line naming the file, the resource and the field::

    shop.toml: TrafficRoute "orders-migration": rule[1].split[0].weight: must not be negative

Nothing is half-loaded: ``load_paths`` returns all resources or raises ``PolicyError``
with all problems.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from meshagent.config.duration import format_duration
from meshagent.config.load import ConfigError, Duration, convert
from meshagent.policy.model import KINDS, Resource, kind_of
from meshagent.policy.validate import validate

SUFFIXES = (".toml", ".json")


class PolicyError(Exception):
    """One or more problems in policy documents; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def summary(self) -> str:
        """The first problem, and how many more there are (one line)."""
        more = len(self.problems) - 1
        return self.problems[0] + (f" (and {more} more: meshagent check)" if more else "")


def _parse(data: bytes, source: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError([f"{source}: not UTF-8 text"]) from None
    if source.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyError([f"{source}: not valid JSON: {exc}"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError([f"{source}: not valid TOML: {exc}"]) from None


def _label(kind: str, index: int, item: Any) -> str:
    name = item.get("name") if isinstance(item, dict) else None
    return f'{kind} "{name}"' if isinstance(name, str) and name else f"{kind}[{index}]"


def load_document(data: bytes, *, source: str) -> list[Resource]:
    """Decode and validate one document (JSON if ``source`` ends in .json, else TOML).

    Raises:
        PolicyError: every problem found, each one line naming ``source``.
    """
    document = _parse(data, source)
    if not isinstance(document, dict):
        raise PolicyError([f"{source}: expected a table of kinds, e.g. [[TrafficRoute]]"])
    problems: list[str] = []
    resources: list[Resource] = []
    for kind, items in document.items():
        if kind not in KINDS:
            known = ", ".join(KINDS)
            problems.append(f"{source}: unknown kind {kind!r}; known kinds: {known}")
            continue
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            problems.append(f"{source}: {kind} must be a list of tables ([[{kind}]])")
            continue
        for index, item in enumerate(items):
            resource, found = _resource(kind, _label(kind, index, item), item, source)
            problems += found
            if resource is not None:
                resources.append(resource)
    if problems:
        raise PolicyError(problems)
    return resources


def _resource(kind: str, label: str, item: Any, source: str) -> tuple[Resource | None, list[str]]:
    """One resource of a known ``kind``, checked (shape, then meaning), or its problems."""
    try:
        resource = convert(item, KINDS[kind], source=f"{source}: {label}")
    except ConfigError as exc:
        return None, [str(exc)]
    violations = validate(resource)
    if violations:
        return None, [f"{source}: {label}: {v}" for v in violations]
    return resource, []


def decode(kind: str, data: bytes, *, source: str) -> Resource:
    """The inverse of ``encode``: one resource of ``kind`` from its JSON, checked as
    ``load_document`` checks it (what the central agent reads back from its store).

    Raises:
        PolicyError: an unknown kind, JSON that is not one table, or every problem of
            the resource, each one line naming ``source``.
    """
    if kind not in KINDS:
        raise PolicyError([f"{source}: unknown kind {kind!r}; known kinds: {', '.join(KINDS)}"])
    try:
        item = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise PolicyError([f"{source}: not valid JSON: {exc}"]) from None
    if not isinstance(item, dict):
        raise PolicyError([f"{source}: expected one {kind} table"])
    resource, problems = _resource(kind, _label(kind, 0, item), item, source)
    if resource is None:
        raise PolicyError(problems)
    return resource


def policy_files(path: Path) -> list[Path]:
    """``path`` itself, or the .toml and .json files directly in it, sorted."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    return [path]


def load_paths(paths: list[Path]) -> list[Resource]:
    """Load every document under ``paths`` (files or directories).

    Raises:
        PolicyError: every problem in every file, and resources defined twice.
    """
    problems: list[str] = []
    resources: list[Resource] = []
    where: dict[tuple[str, str, str], str] = {}
    for path in paths:
        try:
            files = policy_files(path)
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
            continue
        for file in files:
            try:
                data = file.read_bytes()
                loaded = load_document(data, source=str(file))
            except OSError as exc:
                problems.append(f"{file}: {(exc.strerror or str(exc)).lower()}")
                continue
            except PolicyError as exc:
                problems += exc.problems
                continue
            for resource in loaded:
                key = (kind_of(resource), resource.mesh, resource.name)
                if key in where:
                    problems.append(
                        f'{file}: {key[0]} "{key[2]}" in mesh {key[1]!r} is also defined in '
                        f"{where[key]}; names are unique per kind and mesh"
                    )
                    continue
                where[key] = str(file)
                resources.append(resource)
    if problems:
        raise PolicyError(problems)
    return resources


def _encode_duration(value: object) -> object:
    if isinstance(value, Duration):
        return format_duration(value)
    raise NotImplementedError(f"cannot encode {type(value).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=_encode_duration)


def encode(resource: Resource) -> bytes:
    """JSON of one resource in the document's own shape (durations as "5s"), so that
    ``load_document`` reads it back unchanged: what the central agent stores."""
    return _encoder.encode(resource)
