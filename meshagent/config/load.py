"""Strict TOML decoding into msgspec Structs, with path-qualified one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from meshagent.config.duration import parse_duration

T = TypeVar("T")


class ConfigError(Exception):
    """A problem a user can fix in a config file. ``str()`` is one line naming the
    file, the key and what to do."""


class Duration(float):
    """Seconds, written in TOML as a string with a unit: "5s", "250ms", "24h"."""

    __slots__ = ()


def _dec_hook(type_: type[Any], obj: Any) -> Any:
    if type_ is Duration:
        if isinstance(obj, str):
            return Duration(parse_duration(obj))
        raise ValueError('expected a duration string such as "5s", "250ms" or "24h"')
    raise NotImplementedError(f"no decoder for {type_!r}")


def convert(data: Any, type_: type[T], *, source: str) -> T:
    """Decode a parsed document into ``type_``; errors name ``source`` and the key path."""
    try:
        return msgspec.convert(data, type_, dec_hook=_dec_hook, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_humanize(str(exc))}") from None


def load_toml(path: Path, type_: type[T]) -> T:
    """Read and strictly decode a TOML file.

    Raises:
        ConfigError: the file is missing, unreadable, not TOML, or does not fit ``type_``.
    """
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied (run as a user that can read it)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return convert(data, type_, source=str(path))


def _humanize(message: str) -> str:
    """Turn msgspec's "... - at `$.inbound[0].port`" into "inbound[0].port: ..."."""
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        text, where = message, ""
    key = where.rstrip("`").removeprefix("$").removeprefix(".")
    for theirs, ours in _PHRASES:
        if text.startswith(theirs):
            text = ours + text.removeprefix(theirs)
            if ours == "unknown key ":
                text += " (check the spelling; every key is listed in examples/)"
    return _one_line(f"{key}: {text}" if key else text)


def _one_line(text: str) -> str:
    """Control characters (a key named "\\n" in a JSON body) escaped as Python writes
    them, so an error stays one line in a log or an API answer."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_PHRASES = (
    ("Object contains unknown field ", "unknown key "),
    ("Object missing required field ", "missing required key "),
)
