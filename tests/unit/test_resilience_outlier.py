"""Outlier detection with a fake clock: counting, ejection, growth of the ejection time,
return to service, the maximum ejected share and the panic threshold (pure)."""

from __future__ import annotations

import pytest

from mesh.compiled import OutlierDetection
from proxy.resilience import LocalOrigin, OutlierDetector

A, B, C = "10.0.0.1:9080", "10.0.0.2:9080", "10.0.0.3:9080"


def detector(endpoints: tuple[str, ...] = (A, B, C), **config: object) -> OutlierDetector:
    settings = {"max_ejection_percent": 100, **config}
    return OutlierDetector(OutlierDetection(**settings), endpoints)  # type: ignore[arg-type]


def feed(
    d: OutlierDetector, endpoint: str, results: list[int | LocalOrigin], now: float
) -> list[bool]:
    return [d.on_result(endpoint, r, now) for r in results]


@pytest.mark.parametrize(
    ("config", "results", "ejected_at"),
    [
        # default: 5 consecutive 5xx
        ({}, [500] * 5, 4),
        ({}, [503] * 4 + [200] + [503] * 4, None),  # a success resets the count
        ({}, [500, 502, 503, 504, 599], 4),
        ({}, [404] * 10, None),  # 4xx are not errors
        ({"consecutive_5xx_errors": 1}, [500], 0),
        ({"consecutive_5xx_errors": 0}, [500] * 20, None),  # 0 disables
        # gateway errors: 502/503/504 only, off by default
        ({"consecutive_gateway_errors": 2, "consecutive_5xx_errors": 0}, [502, 504], 1),
        ({"consecutive_gateway_errors": 2, "consecutive_5xx_errors": 0}, [502, 500, 503], None),
        ({"consecutive_5xx_errors": 0}, [503] * 20, None),
        # local-origin failures count as 503 / 504 when not split
        ({}, [LocalOrigin.CONNECT_FAILED] * 5, 4),
        ({}, [LocalOrigin.RESET, LocalOrigin.TIMEOUT] * 3, 4),
        (
            {"consecutive_gateway_errors": 3, "consecutive_5xx_errors": 0},
            [LocalOrigin.TIMEOUT] * 3,
            2,
        ),
        ({}, [LocalOrigin.CONNECT_SUCCESS] * 10, None),
        # split: local failures have their own counter, 5xx only counts responses
        (
            {"split_external_local_origin_errors": True, "consecutive_local_origin_failures": 2},
            [LocalOrigin.CONNECT_FAILED, LocalOrigin.TIMEOUT],
            1,
        ),
        (
            {"split_external_local_origin_errors": True, "consecutive_local_origin_failures": 2},
            [LocalOrigin.CONNECT_FAILED, 200, LocalOrigin.CONNECT_FAILED],
            None,
        ),
        (
            {"split_external_local_origin_errors": True, "consecutive_local_origin_failures": 2},
            [LocalOrigin.RESET, LocalOrigin.CONNECT_SUCCESS, LocalOrigin.RESET],
            None,
        ),
        (
            # split: 4 local failures stay under their own threshold (5) and do not
            # count as 5xx; then two 500 responses reach consecutive5xxErrors
            {"split_external_local_origin_errors": True, "consecutive_5xx_errors": 2},
            [LocalOrigin.CONNECT_FAILED] * 4 + [500, 500],
            5,
        ),
    ],
)
def test_consecutive_errors_eject(
    config: dict[str, object], results: list[int | LocalOrigin], ejected_at: int | None
) -> None:
    d = detector(**config)
    outcome = feed(d, A, results, now=0.0)
    expected = [i == ejected_at for i in range(len(results))]
    assert outcome == expected
    assert (A in d.ejected(0.0)) is (ejected_at is not None)


def test_ejection_lasts_base_time_then_the_endpoint_returns() -> None:
    d = detector(consecutive_5xx_errors=1, base_ejection_time_ms=30_000)
    assert d.on_result(A, 503, now=100.0)
    assert d.ejected(100.0) == {A}
    assert d.ejected(129.9) == {A}
    assert d.ejected(130.0) == frozenset()
    assert d.tick(129.0) == []
    assert d.tick(130.0) == [A]
    assert d.snapshot(130.0)[0].ejected is False


def test_ejection_time_grows_with_each_ejection_and_shrinks_while_healthy() -> None:
    d = detector(consecutive_5xx_errors=1, base_ejection_time_ms=10_000, interval_ms=10_000)
    now = 0.0
    durations = []
    for _ in range(3):
        assert d.on_result(A, 500, now)
        until = d.snapshot(now)[0].ejected_until
        assert until is not None
        durations.append(until - now)
        now = until
        assert d.tick(now) == [A]
    assert durations == [10.0, 20.0, 30.0]
    assert d.snapshot(now)[0].times_ejected == 3
    # two healthy sweeps bring the multiplier from 3 down to 1
    d.tick(now + 10)
    d.tick(now + 20)
    assert d.snapshot(now)[0].ejection_multiplier == 1
    assert d.on_result(A, 500, now + 30)
    assert d.snapshot(now + 30)[0].ejected_until == pytest.approx(now + 30 + 20)


def test_ejection_time_is_capped_at_300s() -> None:
    d = detector(consecutive_5xx_errors=1, base_ejection_time_ms=100_000)
    now = 0.0
    durations = []
    for _ in range(6):
        assert d.on_result(A, 500, now)
        until = d.snapshot(now)[0].ejected_until
        assert until is not None
        durations.append(until - now)
        now = until
        d.tick(now)
    assert durations == [100.0, 200.0, 300.0, 300.0, 300.0, 300.0]
    assert d.snapshot(now)[0].ejection_multiplier == 4  # stops growing past the cap


def test_base_ejection_time_above_300s_is_not_cut() -> None:
    d = detector(consecutive_5xx_errors=1, base_ejection_time_ms=600_000)
    d.on_result(A, 500, 0.0)
    assert d.snapshot(0.0)[0].ejected_until == 600.0


@pytest.mark.parametrize(
    ("endpoints", "max_percent", "ejectable"),
    [
        (3, 10, 1),  # Istio's default 10%: still one endpoint of three
        (10, 10, 1),
        (20, 10, 2),
        (3, 34, 2),  # 0% < 34, 33% < 34, 66% >= 34
        (3, 100, 3),
        (4, 50, 2),
    ],
)
def test_max_ejection_percent(endpoints: int, max_percent: int, ejectable: int) -> None:
    hosts = tuple(f"10.0.0.{i}:80" for i in range(endpoints))
    d = detector(hosts, consecutive_5xx_errors=1, max_ejection_percent=max_percent)
    ejected = sum(d.on_result(h, 500, 0.0) for h in hosts)
    assert ejected == ejectable
    assert d.overflows == endpoints - ejectable


def test_a_refused_ejection_resets_the_counter() -> None:
    d = detector((A, B), consecutive_5xx_errors=2, max_ejection_percent=10)
    assert feed(d, A, [500, 500], 0.0) == [False, True]
    assert feed(d, B, [500, 500], 0.0) == [False, False]  # refused: 50% >= 10%
    assert d.snapshot(0.0)[1].consecutive_5xx == 0


def test_min_health_percent_panic_uses_every_endpoint() -> None:
    d = detector(consecutive_5xx_errors=1, min_health_percent=50)
    d.on_result(A, 500, 0.0)
    assert d.ejected(0.0) == {A}  # 66% healthy
    d.on_result(B, 500, 0.0)
    assert d.ejected(0.0) == frozenset()  # 33% < 50%: panic, all endpoints used
    default = detector(consecutive_5xx_errors=1)
    for host in (A, B, C):
        default.on_result(host, 500, 0.0)
    assert default.ejected(0.0) == {A, B, C}  # 0 disables the panic threshold


def test_errors_while_ejected_do_not_extend_the_ejection() -> None:
    d = detector(consecutive_5xx_errors=1, base_ejection_time_ms=10_000)
    assert d.on_result(A, 500, 0.0)
    assert not d.on_result(A, 500, 5.0)
    assert d.snapshot(5.0)[0].ejected_until == 10.0


def test_returned_endpoint_starts_counting_afresh() -> None:
    d = detector(consecutive_5xx_errors=3, base_ejection_time_ms=1000)
    feed(d, A, [500, 500, 500], 0.0)
    feed(d, A, [500, 500], 0.5)  # charged while ejected
    assert d.tick(1.0) == [A]
    assert feed(d, A, [500, 500], 1.0) == [False, False]


def test_endpoint_changes() -> None:
    d = detector(consecutive_5xx_errors=1)
    d.on_result(A, 500, 0.0)
    d.set_endpoints([A, C, "10.0.0.4:9080"])
    assert d.ejected(0.0) == {A}
    assert not d.on_result(B, 500, 0.0)  # removed: ignored
    d.set_endpoints([C])
    assert d.ejected(0.0) == frozenset()
    assert [h.endpoint for h in d.snapshot(0.0)] == [C]


def test_update_keeps_state() -> None:
    d = detector(consecutive_5xx_errors=3)
    feed(d, A, [500, 500], 0.0)
    d.update(OutlierDetection(consecutive_5xx_errors=3, max_ejection_percent=100))
    assert d.on_result(A, 500, 0.0)


def test_snapshot_reports_counters() -> None:
    d = detector(consecutive_gateway_errors=10, split_external_local_origin_errors=True)
    feed(d, B, [502, 502, LocalOrigin.TIMEOUT], 0.0)
    health = {h.endpoint: h for h in d.snapshot(0.0)}
    assert health[B].consecutive_5xx == 2
    assert health[B].consecutive_gateway_errors == 2
    assert health[B].consecutive_local_origin_failures == 1
    assert health[A].times_ejected == 0
    assert d.interval_s == 10.0
