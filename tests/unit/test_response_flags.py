"""`ResponseFlag`: Envoy's short codes by name, in Envoy's order, equal to the strings
they replace, so flags on the wire, in access records and in metric labels keep their
values."""

from __future__ import annotations

import msgspec

from proxy.forward import _FLAG_ORDER, join_flags
from proxy.http.local_reply import DEADLINE_EXCEEDED, grpc_status_for
from proxy.resilience import FaultDecision, RetryVerdict
from proxy.resilience.ratelimit import RateDecision
from proxy.response_flags import ResponseFlag

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
