"""Fault injection on Envoy: an Istio `fault.abort.grpcStatus` becomes the fault
filter's `abort.grpc_status` (Envoy then answers HTTP 200, trailers-only for gRPC)."""

from __future__ import annotations

from mesh.compiled import FaultAbort, FaultInjection, HTTPRoute
from tests.unit.test_envoy_translate import V1, reviews_routes, table

FAULT = "envoy.filters.http.fault"


def abort_of(abort: FaultAbort) -> dict[str, object]:
    rule = HTTPRoute(route=(V1,), fault=FaultInjection(abort=abort))
    (route,) = reviews_routes(table(rule))
    return route["typedPerFilterConfig"][FAULT]["abort"]  # type: ignore[no-any-return]


def test_a_grpc_status_abort_is_the_fault_filters_grpc_status() -> None:
    assert abort_of(FaultAbort(http_status=200, grpc_status=14, percentage=100.0)) == {
        "grpcStatus": 14,
        "percentage": {"numerator": 1_000_000, "denominator": "MILLION"},
    }


def test_an_http_status_abort_stays_an_http_status() -> None:
    assert abort_of(FaultAbort(http_status=503, percentage=0.1)) == {
        "httpStatus": 503,
        "percentage": {"numerator": 1000, "denominator": "MILLION"},
    }
