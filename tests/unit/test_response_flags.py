"""`ResponseFlag`: Envoy's short codes by name, in Envoy's order, equal to the strings
they replace, so flags on the wire, in access records and in metric labels keep their
values."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from proxy.http import UpstreamConnectError, UpstreamProtocolError, UpstreamResetError
from proxy.http.client import StaleConnectionError
from proxy.http.h2.client import H2NotNegotiated
from proxy.http.local_reply import DEADLINE_EXCEEDED, grpc_status_for
from proxy.http.pool import PoolOverflowError
from proxy.resilience import Failure, FaultDecision, LocalOrigin, RetryVerdict
from proxy.resilience.ratelimit import RateDecision
from proxy.response_flags import _FLAG_ORDER, ResponseFlag, join_flags
from proxy.upstream_failure import upstream_failure

ENVOY_CODES = (
    "LH UH UT LR UR UF UC UO NR DI FI RL UAEX RLSE DC URX SI IH DPE UMSDR RFCF NFCF DT UPE "
    "NC OM DF DO DR UDO"
).split()


def test_the_codes_are_envoys_in_envoys_order_then_ours() -> None:
    assert [flag.value for flag in ResponseFlag] == [*ENVOY_CODES, "RBAC"]
    # joined flags are printed in this order
    assert [f for f in ResponseFlag if f in _FLAG_ORDER] == sorted(_FLAG_ORDER, key=_FLAG_ORDER.get)
    assert join_flags(ResponseFlag.UPSTREAM_RETRY_LIMIT_EXCEEDED, "UF") == "UF,URX"


def test_a_flag_is_the_string_it_replaces() -> None:
    flag = ResponseFlag.UPSTREAM_OVERFLOW
    assert flag == "UO" and f"{flag}" == "UO" and hash(flag) == hash("UO")
    assert {"UO": 1}[flag] == 1  # same metric series as the plain string
    assert msgspec.json.encode({"response_flags": flag}) == b'{"response_flags":"UO"}'
    assert ",".join(FaultDecision(5, 500).flags) == "DI,FI"


def test_producers_keep_their_values() -> None:
    assert RetryVerdict.EXHAUSTED.flag == "URX"
    assert RateDecision(allowed=False).flag == "RL"
    assert grpc_status_for(504, "UT,URX") == DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("error", "failure", "flag", "status", "details", "origin"),
    [
        (TimeoutError(), Failure.TIMEOUT, "UT", 504, "upstream request timeout", LocalOrigin.TIMEOUT),
        (
            PoolOverflowError("queue full"),
            Failure.OVERFLOW, "UO", 503, "upstream overflow: queue full", None,
        ),
        (
            UpstreamConnectError("refused"),
            Failure.CONNECT_FAILURE, "UF", 503, "upstream connect error: refused",
            LocalOrigin.CONNECT_FAILED,
        ),
        (
            H2NotNegotiated("no h2"),
            Failure.CONNECT_FAILURE, "UF", 503, "upstream connect error: no h2",
            LocalOrigin.CONNECT_FAILED,
        ),
        (
            UpstreamResetError("eof"),
            Failure.RESET, "UC", 503, "upstream connection closed: eof", LocalOrigin.RESET,
        ),
        (
            StaleConnectionError("stale"),
            Failure.RESET, "UC", 503, "upstream connection closed: stale", LocalOrigin.RESET,
        ),
        (
            UpstreamProtocolError("bad head"),
            Failure.RESET, "UPE", 502, "upstream protocol error: bad head", LocalOrigin.RESET,
        ),
    ],
)  # fmt: skip
def test_one_mapping_from_upstream_failures(
    error: BaseException,
    failure: Failure,
    flag: str,
    status: int,
    details: str,
    origin: LocalOrigin | None,
) -> None:
    found = upstream_failure(error)
    assert found == (failure, flag, status, details)
    assert isinstance(found.flag, ResponseFlag)
    assert found.local_origin is origin


def test_what_is_no_upstream_failure_propagates() -> None:
    assert upstream_failure(ValueError("a bug")) is None
    assert upstream_failure(asyncio.CancelledError()) is None
