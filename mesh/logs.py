"""structlog set-up: JSON lines when not on a terminal, readable console output when on one.

Logs are events with fields (`log.info("config.applied", subject=..., revision=...)`);
secrets and private keys never reach a log.

Modules create their loggers at import (`log = get_logger(__name__)`), before the
process calls `configure()`. A structlog logger that is bound at that point is built
from structlog's defaults (every level, console format, stdout) and keeps them, so
`get_logger` returns a `MeshLogger` instead: it builds its structlog logger on first
use and again after every `configure()`, and keeps it in between (structlog's
`cache_logger_on_first_use`, per configuration).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

# bumped by every `configure()`: loggers built under an older one are rebuilt
_generation = 0


def configure(level: str | None = None, *, json: bool | None = None, stream: Any = None) -> None:
    global _generation
    stream = stream or sys.stderr
    level_name = (level or os.environ.get("MESH_LOG_LEVEL", "info")).upper()
    if json is None:
        env = os.environ.get("MESH_LOG_FORMAT")
        json = env == "json" if env else not stream.isatty()
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelName(level_name) if level_name in logging._nameToLevel else logging.INFO
        ),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        # structlog's lazy loggers keep the first configuration they were used under;
        # a MeshLogger notices a later one (`_generation`)
        cache_logger_on_first_use=True,
    )
    # libraries using stdlib logging (aiohttp, grpc, nats) go to the same stream, quietly
    logging.basicConfig(stream=stream, level=logging.WARNING, format="%(name)s %(message)s")
    _generation += 1


class MeshLogger:
    """A structlog logger (`info`, `warning`, `exception`, ...) with bound fields, built
    from the configuration in force when it is used."""

    __slots__ = ("_built", "_built_for", "_fields")

    def __init__(self, fields: dict[str, Any]):
        self._fields = fields
        self._built: Any = None
        self._built_for = -1

    def _logger(self) -> Any:
        if self._built_for != _generation:
            self._built = structlog.get_logger().bind(**self._fields)
            self._built_for = _generation
        return self._built

    def __getattr__(self, name: str) -> Any:
        # the level methods; called only for what the class itself does not have
        if name.startswith("_"):  # e.g. a slot not yet set, while copying
            raise AttributeError(name)
        return getattr(self._logger(), name)

    def bind(self, **fields: Any) -> MeshLogger:
        return MeshLogger({**self._fields, **fields})

    def unbind(self, *keys: str) -> MeshLogger:
        missing = [k for k in keys if k not in self._fields]
        if missing:
            raise KeyError(missing[0])
        return self.try_unbind(*keys)

    def try_unbind(self, *keys: str) -> MeshLogger:
        return MeshLogger({k: v for k, v in self._fields.items() if k not in keys})

    def new(self, **fields: Any) -> MeshLogger:
        return MeshLogger(dict(fields))


def get_logger(name: str, **fields: Any) -> Any:
    """A logger whose events carry `component=name` and `fields`; safe to create at
    import, before `configure()`."""
    return MeshLogger({"component": name, **fields})
