"""Fault injection and mirroring decisions: percentages with injected draws (pure)."""

from __future__ import annotations

import random

import pytest

from mesh.compiled import FaultAbort, FaultDelay, FaultInjection
from proxy.resilience import (
    NO_FAULT,
    FaultDecision,
    decide_fault,
    mirror_authority,
    should_mirror,
)

DELAY = FaultDelay(fixed_delay_ms=7000, percentage=50.0)
ABORT = FaultAbort(http_status=500, percentage=10.0)


@pytest.mark.parametrize(
    ("fault", "rand_delay", "rand_abort", "decision"),
    [
        (None, 0.0, 0.0, NO_FAULT),
        (FaultInjection(delay=DELAY), 0.0, 0.0, FaultDecision(delay_ms=7000)),
        (FaultInjection(delay=DELAY), 0.4999, 0.0, FaultDecision(delay_ms=7000)),
        (FaultInjection(delay=DELAY), 0.5, 0.0, NO_FAULT),
        (FaultInjection(abort=ABORT), 0.0, 0.0999, FaultDecision(abort_status=500)),
        (FaultInjection(abort=ABORT), 0.0, 0.1, NO_FAULT),
        (FaultInjection(delay=DELAY, abort=ABORT), 0.1, 0.05, FaultDecision(7000, 500)),
        (FaultInjection(delay=DELAY, abort=ABORT), 0.9, 0.05, FaultDecision(0, 500)),
        # Istio: no percentage means no request is affected
        (FaultInjection(abort=FaultAbort(http_status=503)), 0.0, 0.0, NO_FAULT),
        (FaultInjection(delay=FaultDelay(fixed_delay_ms=5)), 0.0, 0.0, NO_FAULT),
        # a gRPC status abort carries its code to the local reply
        (
            FaultInjection(abort=FaultAbort(http_status=200, grpc_status=14, percentage=100.0)),
            0.0,
            0.5,
            FaultDecision(abort_status=200, abort_grpc_status=14),
        ),
        # 100% always, whatever the draw
        (
            FaultInjection(abort=FaultAbort(http_status=503, percentage=100.0)),
            0.0,
            0.999999,
            FaultDecision(abort_status=503),
        ),
    ],
)
def test_decide_fault(
    fault: FaultInjection | None, rand_delay: float, rand_abort: float, decision: FaultDecision
) -> None:
    assert decide_fault(fault, rand_delay, rand_abort) == decision


def test_flags() -> None:
    assert FaultDecision(delay_ms=5).flags == ("DI",)
    assert FaultDecision(abort_status=500).flags == ("FI",)
    assert FaultDecision(5, 500).flags == ("DI", "FI")
    assert NO_FAULT.flags == ()


def test_fifty_percent_abort_over_many_requests() -> None:
    fault = FaultInjection(abort=FaultAbort(http_status=500, percentage=50.0))
    rng = random.Random(7)
    aborted = sum(
        decide_fault(fault, rng.random(), rng.random()).abort_status == 500 for _ in range(10_000)
    )
    assert 4800 <= aborted <= 5200


def test_percentages_have_millionth_resolution() -> None:
    tiny = FaultInjection(abort=FaultAbort(http_status=500, percentage=0.0001))
    assert decide_fault(tiny, 0.0, 0.0000009).abort_status == 500
    assert decide_fault(tiny, 0.0, 0.000001).abort_status == 0


@pytest.mark.parametrize(
    ("percentage", "rand", "mirrored"),
    [(100.0, 0.999999, True), (0.0, 0.0, False), (25.0, 0.2499, True), (25.0, 0.25, False)],
)
def test_should_mirror(percentage: float, rand: float, mirrored: bool) -> None:
    assert should_mirror(percentage, rand) is mirrored


@pytest.mark.parametrize(
    ("authority", "shadow"),
    [
        ("reviews", "reviews-shadow"),
        ("reviews:9080", "reviews-shadow:9080"),
        ("reviews.default.svc.cluster.local:9080", "reviews.default.svc.cluster.local-shadow:9080"),
        ("10.0.0.1:80", "10.0.0.1-shadow:80"),
        ("[::1]:8080", "[::1]-shadow:8080"),
        ("[::1]", "[::1]-shadow"),
    ],
)
def test_mirror_authority(authority: str, shadow: str) -> None:
    assert mirror_authority(authority) == shadow
