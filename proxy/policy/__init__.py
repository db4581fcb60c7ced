"""The sidecar's inbound policy core: pure functions, no I/O.

Per inbound request, the path the policy sees is the one the engine normalised before
any routing (`proxy.http.target`, re-exported here as `normalize_path`/`PathError`),
and the same path is forwarded to the app; the I/O layer picks the listener's mode
with `effective_mtls` when the config changes; and, unless `Authorizer.empty`, builds
`RequestFacts` and asks the workload's `Authorizer` (rebuilt with `Authorizer.build`
on each `InboundPolicy`) for a `Decision`, answering 403 when it is not allowed. The
TCP relay asks `Authorizer.decide_connection` with `ConnectionFacts` once per accepted
connection and closes a denied one at once. `Decision.shadow` is what dry-run policies
would have decided (log and count it). Before authorization, `Authenticator` (built
per `InboundPolicy` like the authorizer) validates the request's JWT
(RequestAuthentication); its identity becomes `RequestFacts.auth`.
"""

from .authz import (
    Authorizer,
    ConnectionFacts,
    Decision,
    RequestFacts,
    ShadowDecision,
    original_client,
)
from .jwks import JwksCache
from .jwt import Authenticator, AuthIdentity, KeysNeeded, Verdict
from .paths import PathError, normalize_path
from .peer import EffectiveMode, effective_mtls

__all__ = [
    "AuthIdentity",
    "Authenticator",
    "Authorizer",
    "ConnectionFacts",
    "Decision",
    "EffectiveMode",
    "JwksCache",
    "KeysNeeded",
    "PathError",
    "RequestFacts",
    "ShadowDecision",
    "Verdict",
    "effective_mtls",
    "normalize_path",
    "original_client",
]
