"""The one mapping from an upstream failure (an exception raised while sending a
request to, or connecting to, an upstream) to what the proxy makes of it: the retry
condition it counts as, the outlier detector's local-origin result, and the local
reply (status, Envoy response flag, details). Pure; applied in one place,
`proxy.forward.request_pool`, which every HTTP request to an upstream goes through
(`proxy.cluster_send`, and ALLOW_ANY's `forward`), so one failure is flagged alike
everywhere.

| raised                   | failure         | flag | status | outlier result  |
|--------------------------|-----------------|------|--------|-----------------|
| `TimeoutError`           | TIMEOUT         | UT   | 504    | TIMEOUT         |
| `PoolOverflowError`      | OVERFLOW        | UO   | 503    | (not reported)  |
| `UpstreamConnectError`   | CONNECT_FAILURE | UF   | 503    | CONNECT_FAILED  |
| `UpstreamResetError`     | RESET           | UC   | 503    | RESET           |
| other `UpstreamError`    | RESET           | UPE  | 502    | RESET           |

Anything else is not an upstream failure and propagates (`upstream_failure` returns
None).
"""

from __future__ import annotations

from typing import NamedTuple

from proxy.http import UpstreamConnectError, UpstreamError, UpstreamResetError
from proxy.http.pool import PoolOverflowError
from proxy.resilience import Failure, LocalOrigin
from proxy.response_flags import ResponseFlag


class UpstreamFailure(NamedTuple):
    """What one failed attempt amounts to."""

    failure: Failure
    flag: ResponseFlag
    status: int
    details: str

    @property
    def local_origin(self) -> LocalOrigin | None:
        """The outlier detector's result for it (None: not the endpoint's doing)."""
        return _LOCAL_ORIGIN.get(self.failure)


_LOCAL_ORIGIN = {
    Failure.CONNECT_FAILURE: LocalOrigin.CONNECT_FAILED,
    Failure.RESET: LocalOrigin.RESET,
    Failure.REFUSED_STREAM: LocalOrigin.RESET,
    Failure.TIMEOUT: LocalOrigin.TIMEOUT,
}

TIMED_OUT = UpstreamFailure(
    Failure.TIMEOUT, ResponseFlag.UPSTREAM_REQUEST_TIMEOUT, 504, "upstream request timeout"
)


def upstream_failure(error: BaseException) -> UpstreamFailure | None:
    """The failure `error` is, or None when it is no upstream failure (re-raise it)."""
    if isinstance(error, TimeoutError):
        return TIMED_OUT
    if isinstance(error, PoolOverflowError):
        return UpstreamFailure(
            Failure.OVERFLOW, ResponseFlag.UPSTREAM_OVERFLOW, 503, f"upstream overflow: {error}"
        )
    if isinstance(error, UpstreamConnectError):
        return UpstreamFailure(
            Failure.CONNECT_FAILURE,
            ResponseFlag.UPSTREAM_CONNECTION_FAILURE,
            503,
            f"upstream connect error: {error}",
        )
    if isinstance(error, UpstreamResetError):
        return UpstreamFailure(
            Failure.RESET,
            ResponseFlag.UPSTREAM_CONNECTION_TERMINATION,
            503,
            f"upstream connection closed: {error}",
        )
    if isinstance(error, UpstreamError):
        return UpstreamFailure(
            Failure.RESET,
            ResponseFlag.UPSTREAM_PROTOCOL_ERROR,
            502,
            f"upstream protocol error: {error}",
        )
    return None
