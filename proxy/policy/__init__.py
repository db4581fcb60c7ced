"""The sidecar's inbound policy core: pure functions, no I/O.

Per inbound request, the I/O layer normalises the request target once with
`normalize_path` (answering 400 on `PathError`) and forwards that same path to the
app; it picks the listener's mode with `effective_mtls` when the config changes; and,
unless `Authorizer.empty`, builds `RequestFacts` and asks the workload's `Authorizer`
(rebuilt with `Authorizer.build` on each `InboundPolicy`) for a `Decision`, answering
403 when it is not allowed. The TCP relay asks `Authorizer.decide_connection` with
`ConnectionFacts` once per accepted connection and closes a denied one at once.
`Decision.shadow` is what dry-run policies would have decided (log and count it).
"""

from .authz import Authorizer, ConnectionFacts, Decision, RequestFacts, ShadowDecision
from .paths import PathError, normalize_path
from .peer import EffectiveMode, effective_mtls

__all__ = [
    "Authorizer",
    "ConnectionFacts",
    "Decision",
    "EffectiveMode",
    "PathError",
    "RequestFacts",
    "ShadowDecision",
    "effective_mtls",
    "normalize_path",
]
