"""Structured logs: one line per event, logfmt (default) or JSON, to stderr.

Usage: ``log = get_logger("outbound"); log.info("connected", conn=7, endpoint="10.0.0.3:15443")``.
The event name comes first so lines read well in ``journalctl``; every line carries
``ts``, ``level`` and ``logger``. Values are quoted only when they need it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, ClassVar, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class _Settings:
    level = _LEVELS["info"]
    fmt = "logfmt"
    stream: TextIO | None = None
    context: ClassVar[dict[str, Any]] = {}


def configure(*, level: str = "info", fmt: str = "logfmt", **context: Any) -> None:
    """Set the level, format and fields added to every line (e.g. ``mesh``, ``node``)."""
    _Settings.level = _LEVELS[level]
    _Settings.fmt = fmt
    _Settings.context = dict(context)


def _quote(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n'):
        return text
    return json.dumps(text)


class Logger:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def enabled(self, level: str) -> bool:
        """Would a line at ``level`` be written? (Skip building costly fields if not.)"""
        return _LEVELS[level] >= _Settings.level

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] < _Settings.level:
            return
        record: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
            "level": level,
            "logger": self.name,
            "event": event,
            **_Settings.context,
            **fields,
        }
        if _Settings.fmt == "json":
            line = json.dumps(record, default=str)
        else:
            line = " ".join(f"{k}={_quote(v)}" for k, v in record.items() if v is not None)
        stream = _Settings.stream or sys.stderr
        stream.write(line + "\n")
        stream.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


def get_logger(name: str) -> Logger:
    return Logger(name)
