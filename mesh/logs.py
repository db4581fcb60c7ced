"""structlog set-up: JSON lines when not on a terminal, readable console output when on one.

Logs are events with fields (`log.info("config.applied", subject=..., revision=...)`);
secrets and private keys never reach a log.

Modules create their loggers at import (`log = get_logger(__name__)`), before the
process calls `configure()`. A structlog logger that is bound at that point is built
from structlog's defaults (every level, console format, stdout) and keeps them, so
`get_logger` returns a `MeshLogger` instead: it builds its structlog logger on first
use and again after every `configure()`, and keeps it in between (structlog's
`cache_logger_on_first_use`, per configuration).

Exceptions are rendered without local variables, in both formats: a frame's locals
hold requests, headers and credentials (structlog's `dict_tracebacks` and rich show
them by default). Code that logs errors a client can trigger at will uses
`exception_fields` (type, short message, locals-free traceback) and a
`LogRateLimiter`, so one request cannot turn into pages of log.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Hashable
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

# bumped by every `configure()`: loggers built under an older one are rebuilt
_generation = 0


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written, not when `configure()` ran: a
    process (or a test harness) may replace it later, and a logger must never write to
    a stream that was closed since."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def configure(level: str | None = None, *, json: bool | None = None, stream: Any = None) -> None:
    global _generation
    stream = stream or _CurrentStderr()
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
        processors += [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [
            structlog.dev.ConsoleRenderer(
                colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
            )
        ]
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


# longest error message kept in a log record: enough to tell what went wrong, too short
# to carry a request
MAX_ERROR_MESSAGE = 200


def exception_fields(error: BaseException) -> dict[str, str]:
    """Log fields describing `error`: `error_type`, `error` (its message, cut to
    `MAX_ERROR_MESSAGE`), `at` (file:line where it was raised) and `traceback` (the
    frames, without local variables)."""
    message = str(error)
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + "..."
    frames = traceback.extract_tb(error.__traceback__)
    at = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return {
        "error_type": type(error).__name__,
        "error": message,
        "at": at,
        "traceback": "".join(frames.format()),
    }


class LogRateLimiter:
    """At most `burst` records per key in each `window` seconds; the rest are counted.

    `admit(key)` returns None when the record must be dropped, else how many records
    of that key were dropped since the last one admitted (to log with it). Pure state,
    clock injected; at most `max_keys` keys are tracked (beyond that the table starts
    over, losing only counts).
    """

    __slots__ = ("_burst", "_clock", "_keys", "_max_keys", "_window")

    def __init__(
        self,
        burst: int = 5,
        window: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        if burst < 1 or window <= 0:
            raise ValueError("LogRateLimiter needs burst >= 1 and window > 0")
        self._burst = burst
        self._window = window
        self._clock = clock
        self._max_keys = max_keys
        # key -> [window start, admitted in window, dropped since last admitted]
        self._keys: dict[Hashable, list[float]] = {}

    def admit(self, key: Hashable) -> int | None:
        now = self._clock()
        state = self._keys.get(key)
        if state is None:
            if len(self._keys) >= self._max_keys:
                self._keys.clear()
            state = self._keys[key] = [now, 0, 0]
        elif now - state[0] >= self._window:
            state[0], state[1] = now, 0
        if state[1] >= self._burst:
            state[2] += 1
            return None
        state[1] += 1
        dropped, state[2] = int(state[2]), 0
        return dropped
