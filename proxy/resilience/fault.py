"""Fault injection decisions (a rule's `fault`). Pure: the caller passes the draws.

The rule's matches already scope the fault (e.g. only `end-user: jason`). For each
request the data path draws two uniform numbers in [0, 1) and asks `decide_fault`;
it then sleeps `delay_ms` (flag `DI`) and, when `abort_status` is set, answers it
without contacting the upstream (flag `FI`), as Envoy's fault filter does: delay
first, then abort. A `grpcStatus` abort is HTTP 200 with `abort_grpc_status`, which a
gRPC request receives as its trailers-only reply's grpc-status. Percentages have
Envoy's resolution (millionths) and Istio's defaults (no `percentage`: no request is affected).
"""

from __future__ import annotations

from typing import NamedTuple

from mesh.compiled import FaultInjection
from proxy.response_flags import ResponseFlag

from ._sampling import percent_hit


class FaultDecision(NamedTuple):
    delay_ms: int = 0
    # 0 = do not abort
    abort_status: int = 0
    # a `grpcStatus` abort: the grpc-status of the trailers-only reply to a gRPC request
    abort_grpc_status: int | None = None

    @property
    def flags(self) -> tuple[str, ...]:
        """Envoy response flags for the access log and `response_flags`."""
        delayed = (ResponseFlag.DELAY_INJECTED,) if self.delay_ms else ()
        return delayed + ((ResponseFlag.FAULT_INJECTED,) if self.abort_status else ())


NO_FAULT = FaultDecision()


def decide_fault(
    fault: FaultInjection | None, rand_delay: float, rand_abort: float
) -> FaultDecision:
    """The faults to inject into one request, from independent draws in [0, 1)."""
    if fault is None:
        return NO_FAULT
    delay_ms = abort_status = 0
    abort_grpc_status = None
    delay, abort = fault.delay, fault.abort
    if delay is not None and percent_hit(delay.percentage, rand_delay):
        delay_ms = delay.fixed_delay_ms
    if abort is not None and percent_hit(abort.percentage, rand_abort):
        abort_status, abort_grpc_status = abort.http_status, abort.grpc_status
    if not delay_ms and not abort_status:
        return NO_FAULT
    return FaultDecision(delay_ms, abort_status, abort_grpc_status)
