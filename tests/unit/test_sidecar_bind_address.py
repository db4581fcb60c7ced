"""`meshctl sidecar --bind`: the bind address is the registered one (found by
the multi-host suite, tests/hosts/): a wildcard would be registered as such, and a
sidecar on another host dialing 0.0.0.0 reaches its own loopback instead."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshctl.sidecar_cmds import registrable_bind


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "[::]"])
def test_a_wildcard_bind_is_refused_naming_the_flag(address: str) -> None:
    reason = registrable_bind(address)
    assert reason is not None and reason.startswith(f"--bind {address}")


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.5", "fd00::2", "reviews-0.pods"])
def test_a_host_address_or_name_is_registered_as_given(address: str) -> None:
    assert registrable_bind(address) is None


def test_meshctl_sidecar_refuses_a_wildcard_bind_before_starting() -> None:
    args = [sys.executable, "-m", "meshctl.main", "--nats", "nats://127.0.0.1:9", "sidecar"]
    args += ["--service", "x", "--app-port", "8080", "--bind", "0.0.0.0", "--no-mtls"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--bind 0.0.0.0" in done.stderr and "Traceback" not in done.stderr, done.stderr
