"""`mesh.logs`: what a process's logs look like once `configure()` ran, for every
logger, including those modules create at import time, before it runs."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import pytest
import structlog

from mesh import logs

# as a module does at import, before any `configure()`
IMPORT_TIME_LOGGER = logs.get_logger("tests.import_time", replica="r-1")


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    config = structlog.get_config()
    yield
    structlog.configure(**config)
    logs._generation += 1  # loggers used here rebuild from the restored configuration


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_logger_created_before_configure_follows_it() -> None:
    stream = io.StringIO()
    logs.configure("warning", json=True, stream=stream)
    IMPORT_TIME_LOGGER.info("hidden.below_level")
    IMPORT_TIME_LOGGER.warning("shown.as_json", attempt=2)
    (record,) = lines(stream)
    assert record["event"] == "shown.as_json" and record["level"] == "warning"
    assert (record["component"], record["replica"], record["attempt"]) == (
        "tests.import_time", "r-1", 2,
    )  # fmt: skip


def test_configuring_again_applies_to_loggers_already_used() -> None:
    first, second = io.StringIO(), io.StringIO()
    logs.configure("info", json=True, stream=first)
    log = logs.get_logger("tests.reconfigured")
    bound = log.bind(request="abc")
    log.info("to.first")
    bound.info("to.first.bound")
    logs.configure("error", json=True, stream=second)
    log.warning("dropped.below_level")
    log.error("to.second")
    bound.error("to.second.bound")
    assert [r["event"] for r in lines(first)] == ["to.first", "to.first.bound"]
    assert [(r["event"], r.get("request")) for r in lines(second)] == [
        ("to.second", None), ("to.second.bound", "abc"),
    ]  # fmt: skip


def test_console_format_and_level_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESH_LOG_LEVEL", "debug")
    monkeypatch.setenv("MESH_LOG_FORMAT", "console")
    stream = io.StringIO()
    logs.configure(stream=stream)
    IMPORT_TIME_LOGGER.debug("shown.in_console", key="value")
    out = stream.getvalue()
    assert "shown.in_console" in out and "key=value" in out and not out.startswith("{")
