"""structlog set-up: JSON lines when not on a terminal, readable console output when on one.

Logs are events with fields (`log.info("config.applied", subject=..., revision=...)`);
secrets and private keys never reach a log.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

_configured = False


def configure(level: str | None = None, *, json: bool | None = None, stream: Any = None) -> None:
    global _configured
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
        cache_logger_on_first_use=True,
    )
    # libraries using stdlib logging (aiohttp, grpc, nats) go to the same stream, quietly
    logging.basicConfig(stream=stream, level=logging.WARNING, format="%(name)s %(message)s")
    _configured = True


def get_logger(name: str, **fields: Any) -> Any:
    return structlog.get_logger(name).bind(component=name, **fields)
