"""The sidecar's inbound policy core: pure functions, no I/O.

Per inbound request, the path the policy sees is the one the engine normalised before
any routing (`proxy.http.target`, re-exported here as `normalize_path`/`PathError`),
and the same path is forwarded to the app; the I/O layer picks the listener's mode
with `effective_mtls` when the config changes; and, unless `Authorizer.empty`, builds
`RequestFacts` and asks the workload's `Authorizer` (rebuilt with `Authorizer.build`
on each `InboundPolicy`) for a `Decision`, answering
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
