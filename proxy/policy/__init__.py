"""The sidecar's inbound policy core: pure functions, no I/O.

Per inbound request, the I/O layer normalises the request target once with
`normalize_path` (answering 400 on `PathError`) and forwards that same path to the
app; it picks the listener's mode with `effective_mtls` when the config changes; and,
unless `Authorizer.empty`, builds `RequestFacts` and asks the workload's `Authorizer`
(rebuilt with `Authorizer.build` on each `InboundPolicy`) for a `Decision`, answering
403 when it is not allowed.
"""

from .authz import Authorizer, Decision, RequestFacts
from .paths import PathError, normalize_path
from .peer import EffectiveMode, effective_mtls

__all__ = [
    "Authorizer",
    "Decision",
    "EffectiveMode",
    "PathError",
    "RequestFacts",
    "effective_mtls",
    "normalize_path",
]
