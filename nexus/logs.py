"""How every ``nexus`` role logs: one level and one format, from the flags or the environment.

``--log-level`` (``NEXUS_LOG_LEVEL``, default ``info``) and ``--log-format`` (``NEXUS_LOG_FORMAT``:
``text`` or ``json``, default ``text``) are read once by the ``nexus`` command and applied here to
the root logger, so Nexus's own loggers and the libraries' all go to stderr the same way. The
libraries that log per connection or per rebalance (aiokafka, Faust and its ``mode``, websockets,
httpx) stay at WARNING unless the level is ``debug``: ``info`` shows what Nexus itself says
(a role listening, topics created, a partition rewound), not every Kafka heartbeat.

``json`` writes one object per line, for log collectors::

    {"time": "2025-01-31T12:00:00.123Z", "level": "INFO", "logger": "producers.gateway.app",
     "message": "gateway listening on http://0.0.0.0:3000", "role": "gateway"}

with ``exception`` (the formatted traceback) when the record carries one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

from nexus.settings import ConfigError

LEVEL_ENV = "NEXUS_LOG_LEVEL"
FORMAT_ENV = "NEXUS_LOG_FORMAT"
LEVELS = ("debug", "info", "warning", "error", "critical")
# Faust's --loglevel spellings, kept working: `nexus worker --loglevel warn`.
ALIASES = {"warn": "warning", "crit": "critical", "fatal": "critical"}
LEVEL_CHOICES = (*LEVELS, *ALIASES)
FORMATS = ("text", "json")
DEFAULT_LEVEL = "info"
DEFAULT_FORMAT = "text"
# Libraries that log at INFO per connection, request or rebalance: WARNING unless debugging.
NOISY_LOGGERS = ("aiokafka", "faust", "mode", "websockets", "httpx", "httpcore", "kafka")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


@dataclass(frozen=True)
class LogSettings:
    """The effective level and format, and where each came from (for ``nexus config``)."""

    level: str = DEFAULT_LEVEL
    format: str = DEFAULT_FORMAT
    level_source: str = "default"
    format_source: str = "default"

    @property
    def level_number(self) -> int:
        return int(logging.getLevelName(self.level.upper()))


def level_name(value: str) -> str:
    """The canonical name of a level given as any of :data:`LEVEL_CHOICES`, any case."""
    name = value.strip().lower()
    name = ALIASES.get(name, name)
    if name not in LEVELS:
        raise ValueError(f"expected one of {', '.join(LEVELS)}, got {value!r}")
    return name


def resolve(level: str | None, fmt: str | None, environ: Mapping[str, str]) -> LogSettings:
    """The flags win over the environment, the environment over the defaults."""
    if level:
        level_value, level_source = level, "--log-level"
    elif environ.get(LEVEL_ENV, "").strip():
        level_value, level_source = environ[LEVEL_ENV], f"env {LEVEL_ENV}"
    else:
        level_value, level_source = DEFAULT_LEVEL, "default"
    if fmt:
        format_value, format_source = fmt, "--log-format"
    elif environ.get(FORMAT_ENV, "").strip():
        format_value, format_source = environ[FORMAT_ENV], f"env {FORMAT_ENV}"
    else:
        format_value, format_source = DEFAULT_FORMAT, "default"
    try:
        canonical = level_name(level_value)
    except ValueError as exc:
        raise ConfigError(f"log level (from {level_source}): {exc}") from None
    format_value = format_value.strip().lower()
    if format_value not in FORMATS:
        raise ConfigError(f"log format (from {format_source}): expected one of {', '.join(FORMATS)}, "
                          f"got {format_value!r}")
    return LogSettings(canonical, format_value, level_source, format_source)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ms), level, logger, message, exception."""

    def __init__(self, role: str = "") -> None:
        super().__init__()
        self._role = role

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._role:
            entry["role"] = self._role
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(settings: LogSettings, role: str = "", stream: IO[str] | None = None) -> None:
    """Send every record to ``stream`` (stderr) at ``settings.level``, in ``settings.format``.

    Replaces the root logger's handlers, so a library that configured logging before (or
    ``basicConfig``) does not log twice.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(role) if settings.format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    level = settings.level_number
    root.setLevel(level)
    noisy = level if level <= logging.DEBUG else max(level, logging.WARNING)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(noisy)
    logging.captureWarnings(True)
    global _json
    _json = settings.format == "json"


_json = False


def environment(settings: LogSettings) -> dict[str, str]:
    """What a parent (``nexus up``) puts in its children's environment so they log as it does."""
    return {LEVEL_ENV: settings.level, FORMAT_ENV: settings.format}


def fail(message: str) -> None:
    """Report why a command stops, on one stderr line: plain text, or a JSON record in ``json`` format."""
    if _json:  # an ERROR record whatever the level: the reason a command stops is always said
        logger = logging.getLogger("nexus")
        logger.handle(logger.makeRecord(logger.name, logging.ERROR, "(nexus)", 0, message, (), None))
    else:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def muted(name: str) -> Iterator[None]:
    """Silence logger ``name`` (and its children) for a while, unless debugging.

    For expected failures a caller reports itself: the connection errors aiokafka logs on each
    attempt while a role waits for a broker that is not up yet.
    """
    logger = logging.getLogger(name)
    if name not in _muted and logger.isEnabledFor(logging.DEBUG):
        yield
        return
    if name not in _muted:  # the first of overlapping waits mutes, the last one out restores
        _muted[name] = [0, logger.level]
        logger.setLevel(logging.CRITICAL + 1)
    _muted[name][0] += 1
    try:
        yield
    finally:
        _muted[name][0] -= 1
        if _muted[name][0] == 0:
            logger.setLevel(_muted.pop(name)[1])


_muted: dict[str, list[int]] = {}  # logger name -> [overlapping mutes, level before the first]
