"""gRPC semantics as pure logic: local-reply statuses, the grpc_response_status label,
and which requests take HTTP/2 between sidecars."""

from __future__ import annotations

import pytest

from mesh import telemetry as wire
from proxy.http.h2.exchange import grpc_status_of
from proxy.http.h2.pool import _takes_h1
from proxy.http.local_reply import grpc_local_reply, grpc_status_for, is_grpc
from tests.unit.test_telemetry_core import recorder, request


@pytest.mark.parametrize(
    ("http_status", "flags", "grpc_status"),
    [
        (403, "RBAC", 7),  # authorization denied: PERMISSION_DENIED
        (503, "UH", 14),  # no healthy upstream: UNAVAILABLE
        (429, "RL", 14),  # rate limited: UNAVAILABLE, as Envoy
        (504, "UT", 4),  # route timeout: DEADLINE_EXCEEDED
        (504, "UT,URX", 4),
        (503, "UF,URX", 14),
        (404, "NR", 12),  # no route: UNIMPLEMENTED
        (400, "", 13),
        (401, "", 16),
        (500, "", 2),  # anything else: UNKNOWN
    ],
)
def test_local_reply_grpc_status(http_status: int, flags: str, grpc_status: int) -> None:
    assert grpc_status_for(http_status, flags) == grpc_status
    status, headers = grpc_local_reply(http_status, flags, "no healthy upstream for x")
    assert status == 200
    assert ("content-type", "application/grpc") in headers
    assert ("grpc-status", str(grpc_status)) in headers
    assert ("grpc-message", "no healthy upstream for x") in headers


def test_explicit_grpc_status_wins_and_messages_are_percent_encoded() -> None:
    _, headers = grpc_local_reply(503, "FI", "fault\nabort é", grpc_status=8)
    assert ("grpc-status", "8") in headers
    assert ("grpc-message", "fault%0Aabort %C3%A9") in headers


def test_grpc_requests_are_recognised_by_content_type() -> None:
    assert is_grpc([("content-type", "application/grpc")])
    assert is_grpc([("content-type", "application/grpc+proto")])
    assert not is_grpc([("content-type", "application/json")])
    assert not is_grpc([])


def test_grpc_status_is_read_from_headers_or_trailers() -> None:
    assert grpc_status_of([("grpc-status", "14"), ("grpc-message", "x")]) == "14"
    assert grpc_status_of([("grpc-status", "bad")]) == ""
    assert grpc_status_of(None) == ""


def test_grpc_requests_are_series_of_their_own_with_grpc_response_status() -> None:
    rec = recorder()
    rec.record_request(request(protocol="grpc", grpc_status="0"))
    rec.record_request(request(protocol="grpc", grpc_status="0"))
    rec.record_request(request(protocol="grpc", grpc_status="7", flags="RBAC"))
    rec.record_request(request())
    totals = rec.totals()
    requests = {
        (dict(lbl).get("grpc_response_status"), dict(lbl)["request_protocol"]): value
        for (name, lbl), value in totals.counters.items()
        if name == wire.REQUESTS_TOTAL
    }
    assert requests == {("0", "grpc"): 2, ("7", "grpc"): 1, (None, "http"): 1}


@pytest.mark.parametrize(
    ("headers", "grpc_only", "h1"),
    [
        ([("content-type", "application/json")], False, False),
        ([("upgrade", "websocket"), ("connection", "upgrade")], False, True),
        ([("content-type", "application/json")], True, True),  # connectionPool cluster
        ([("content-type", "application/grpc")], True, False),  # gRPC needs trailers
    ],
)
def test_which_requests_take_http1_between_sidecars(
    headers: list[tuple[str, str]], grpc_only: bool, h1: bool
) -> None:
    assert _takes_h1(headers, grpc_only) is h1
