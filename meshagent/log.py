"""Structured logs: one line per event, logfmt (default) or JSON, to stderr.

Usage: ``log = get_logger("outbound"); log.info("connected", conn=7, endpoint="10.0.0.3:15443")``.
The event name comes first so lines read well in ``journalctl``; every line carries
``ts``, ``level`` and ``logger``. Values are quoted only when they need it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, ClassVar, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class _Settings:
    level = _LEVELS["info"]
    fmt = "logfmt"
    stream: TextIO | None = None
    context: ClassVar[dict[str, Any]] = {}
    # Loggers whose lines go elsewhere than ``stream``: a file, or None (dropped).
    routes: ClassVar[dict[str, TextIO | None]] = {}


def configure(
    *,
    level: str = "info",
    fmt: str = "logfmt",
    routes: dict[str, TextIO | None] | None = None,
    **context: Any,
) -> None:
    """Set the level, format, where some loggers write (``routes``: name -> an open
    text file, or None to drop their lines) and fields added to every line (e.g.
    ``mesh``, ``node``)."""
    _Settings.level = _LEVELS[level]
    _Settings.fmt = fmt
    _Settings.routes = dict(routes or {})
    _Settings.context = dict(context)


def open_log_file(path: str) -> TextIO:
    """Open ``path`` for appending lines (created 0640). Raises OSError.

    Appends are atomic per line and survive ``logrotate``'s ``copytruncate``."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


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
        if self.name in _Settings.routes and _Settings.routes[self.name] is None:
            return False
        return _LEVELS[level] >= _Settings.level

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] < _Settings.level:
            return
        stream = _Settings.stream or sys.stderr
        if self.name in _Settings.routes:
            routed = _Settings.routes[self.name]
            if routed is None:
                return
            stream = routed
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
