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


def _raise_with_a_secret_local() -> None:
    authorization = "Bearer SECRET-TOKEN-123"  # a local, as a request's headers would be
    raise RuntimeError(f"boom ({len(authorization)} chars)")


@pytest.mark.parametrize("json_format", [True, False])
def test_logged_exceptions_carry_no_local_variables(json_format: bool) -> None:
    stream = io.StringIO()
    logs.configure("info", json=json_format, stream=stream)
    log = logs.get_logger("tests.exceptions")
    try:
        _raise_with_a_secret_local()
    except RuntimeError:
        log.exception("failed.with_locals_around")
    out = stream.getvalue()
    assert "failed.with_locals_around" in out and "RuntimeError" in out
    assert "_raise_with_a_secret_local" in out  # the traceback is there
    assert "SECRET-TOKEN-123" not in out  # its locals are not


def test_exception_fields_are_short_and_without_locals() -> None:
    try:
        _raise_with_a_secret_local()
    except RuntimeError as error:
        fields = logs.exception_fields(error)
    assert fields["error_type"] == "RuntimeError"
    assert fields["error"] == "boom (23 chars)"
    assert fields["at"].endswith(
        f"test_logs.py:{_raise_with_a_secret_local.__code__.co_firstlineno + 2}"
    )
    assert "_raise_with_a_secret_local" in fields["traceback"]
    assert "SECRET" not in "".join(fields.values())
    long = logs.exception_fields(ValueError("x" * 1000))
    assert len(long["error"]) == logs.MAX_ERROR_MESSAGE + 3 and long["traceback"] == ""


def test_log_rate_limiter_admits_a_burst_per_key_per_window_and_counts_the_rest() -> None:
    now = [100.0]
    limiter = logs.LogRateLimiter(burst=2, window=1.0, clock=lambda: now[0])
    assert [limiter.admit("a") for _ in range(5)] == [0, 0, None, None, None]
    assert limiter.admit("b") == 0  # keys are independent
    now[0] += 0.5
    assert limiter.admit("a") is None  # same window
    now[0] += 0.5
    # a new window: the first record reports the 4 dropped since the last one admitted
    assert [limiter.admit("a") for _ in range(3)] == [4, 0, None]
    now[0] += 10
    assert limiter.admit("a") == 1


def test_log_rate_limiter_bounds_its_table() -> None:
    limiter = logs.LogRateLimiter(burst=1, clock=lambda: 0.0, max_keys=3)
    for key in range(10):
        assert limiter.admit(key) == 0
    assert len(limiter._keys) <= 3
    with pytest.raises(ValueError, match="burst"):
        logs.LogRateLimiter(burst=0)
