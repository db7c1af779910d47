"""Structured logging: one event per line, JSON in services, readable on a terminal.

Usage::

    log = get_logger("loader").bind(table="dim_patients_staging")
    log.info("batch_committed", rows=5000, duration_ms=41.2)

Every line carries the event name and its fields (job_id, run_id, table, counts, duration...).
A filter scrubs the value of every configured secret (API key, passwords, webhook URL) from
messages and fields, so a secret that leaks into an exception text still never reaches a log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import orjson

_SECRETS: list[str] = []
_CONFIGURED = False
RESERVED = {"event", "ts", "level", "logger", "service", "pid"}


def scrub(text: str) -> str:
    for s in _SECRETS:
        if s and s in text:
            text = text.replace(s, "***")
    return text


def _scrub_value(v: Any) -> Any:
    if isinstance(v, str):
        return scrub(v)
    if isinstance(v, dict):
        return {k: _scrub_value(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_scrub_value(x) for x in v]
    return v


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": self.service,
            "pid": record.process,
            "event": scrub(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update({k: _scrub_value(v) for k, v in fields.items() if k not in RESERVED})
        if record.exc_info:
            out["exception"] = scrub(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


class ConsoleFormatter(logging.Formatter):
    COLORS = {"DEBUG": "\x1b[2m", "INFO": "\x1b[36m", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m", "CRITICAL": "\x1b[41m"}

    def __init__(self, color: bool):
        super().__init__()
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        lvl = record.levelname
        if self.color:
            lvl = f"{self.COLORS.get(lvl, '')}{lvl:<7}\x1b[0m"
        else:
            lvl = f"{lvl:<7}"
        fields = getattr(record, "fields", None) or {}
        kv = " ".join(f"{k}={_fmt(_scrub_value(v))}" for k, v in fields.items())
        line = f"{ts} {lvl} {scrub(record.getMessage())}" + (f"  {kv}" if kv else "")
        if record.exc_info:
            line += "\n" + scrub(self.formatException(record.exc_info))
        return line


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}".rstrip("0").rstrip(".")
    if isinstance(v, str) and (" " in v or not v):
        return repr(v)
    return str(v)


class EventLogger:
    """A logger whose calls take an event name and keyword fields; ``bind`` adds context."""

    __slots__ = ("_logger", "_context")

    def __init__(self, logger: logging.Logger, context: dict[str, Any] | None = None):
        self._logger = logger
        self._context = context or {}

    def bind(self, **fields: Any) -> EventLogger:
        return EventLogger(self._logger, {**self._context, **fields})

    def _log(self, level: int, event: str, exc_info: Any = None, **fields: Any) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, exc_info=exc_info, extra={"fields": {**self._context, **fields}},
                             stacklevel=3)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info=True, **fields)

    def is_enabled_for(self, level: int) -> bool:
        return self._logger.isEnabledFor(level)


def get_logger(name: str) -> EventLogger:
    return EventLogger(logging.getLogger(f"trialsync.{name}"))


def setup_logging(service: str = "cli", level: str | None = None, fmt: str | None = None,
                  log_file: str | os.PathLike[str] | None = None, secrets: list[str] | None = None) -> None:
    """Configure the ``trialsync`` logger tree once per process (re-callable: replaces handlers).

    ``fmt`` 'auto' picks console output on a terminal and JSON lines otherwise (services, CI).
    """
    global _CONFIGURED
    from common.config import ConfigError, get_settings

    try:
        s = get_settings()
        level = level or s.log_level
        fmt = fmt or s.log_format
        log_file = log_file or s.log_file
        _SECRETS[:] = sorted(set((secrets or []) + s.secret_values()), key=len, reverse=True)
    except ConfigError:
        level = level or "INFO"
        fmt = fmt or "auto"
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    root = logging.getLogger("trialsync")
    root.handlers.clear()
    root.setLevel(level or "INFO")
    root.propagate = False
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else ConsoleFormatter(sys.stderr.isatty()))
    root.addHandler(handler)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(JsonFormatter(service))
        root.addHandler(fh)
    _CONFIGURED = True


def route_logs_to_file(path: str | os.PathLike[str], service: str, stderr_level: str | None = "WARNING") -> None:
    """Send this process's structured logs (every level, JSON lines) to ``path`` and keep on stderr
    only ``stderr_level`` and above, as readable one-line messages (None: nothing on stderr).

    Why: a command whose stdout is for people (``trialsync demo``'s progress and tables) must not
    interleave hundreds of JSON lines with it when both streams go to one file
    (``demo > out.txt 2>&1``); the file next to the state keeps the whole machine record, and
    warnings still reach the operator. With ``LOG_FORMAT=json`` set explicitly stderr stays JSON.
    """
    root = logging.getLogger("trialsync")
    for h in list(root.handlers):
        if isinstance(h, logging.StreamHandler):  # FileHandler is a StreamHandler too: replace all
            root.removeHandler(h)
            h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(JsonFormatter(service))
    root.addHandler(fh)
    if stderr_level is not None:
        fmt = "console"
        try:
            from common.config import get_settings

            fmt = "json" if get_settings().log_format == "json" else "console"
        except Exception:  # noqa: BLE001 - a bad setting was already reported at start-up
            pass
        sh = logging.StreamHandler(sys.stderr)
        sh.setLevel(stderr_level)
        sh.setFormatter(JsonFormatter(service) if fmt == "json" else ConsoleFormatter(sys.stderr.isatty()))
        root.addHandler(sh)


def add_secret(value: str | None) -> None:
    """Register one more value to scrub (e.g. a key read from the credentials table's env var)."""
    if value and value not in _SECRETS:
        _SECRETS.append(value)
        _SECRETS.sort(key=len, reverse=True)
