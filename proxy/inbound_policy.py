"""Follow the compiled inbound policy of this sidecar's service
(`mesh.config.inbound.<ns>.<svc>`): request authentication (JWT), authorization,
peer authentication and local rate limits. A gateway follows its own service's
inbound policy too, for the RequestAuthentications and AuthorizationPolicies that
select it.

Policies are compiled for the whole service, selectors kept; this follower keeps what
selects this workload's labels, builds the authorizer once per revision, and swaps it
in one assignment, so requests in flight finish on the policy they started with. A
policy that cannot be applied is NACKed and the last good one stays in force. The rate
limiter is rebuilt with each revision, keeping the token buckets of RateLimitPolicies
that did not change, so a push (of any inbound policy) does not refill them.
"""

from __future__ import annotations

from collections.abc import Callable

from mesh import errors
from mesh.bus import Bus
from mesh.compiled import ExtAuthzProvider, InboundPolicy
from mesh.logs import get_logger
from mesh.messages import FetchRequest, SubscriptionStatus
from proxy.ext_authz import ExtAuthzClient
from proxy.jwks_fetch import JwksFetcher
from proxy.policy import Authenticator, Authorizer, effective_mtls
from proxy.request_authn import RequestAuthentication
from proxy.resilience import InboundRateLimiter
from proxy.settings import SidecarSettings

log = get_logger("proxy.inbound_policy")


class InboundPolicyFollower:
    def __init__(self, bus: Bus, settings: SidecarSettings, on_change: Callable[[], None]):
        self.bus = bus
        self.settings = settings
        self.on_change = on_change
        self.subject = bus.subjects.inbound(settings.namespace, settings.service)
        self.policy: InboundPolicy | None = None
        self.authorizer = Authorizer.build(None, settings.labels)
        self.rate_limiter = InboundRateLimiter()
        self.authentication = RequestAuthentication(JwksFetcher(settings.jwks_ca_file))
        # CUSTOM policies: the authorizer client (set by the sidecar, which owns the
        # destination cache and pools) and the providers the policy defines
        self.ext_authz: ExtAuthzClient | None = None
        self.providers: dict[str, ExtAuthzProvider] = {}
        self.status = SubscriptionStatus(subject=self.subject, revision=0)
        self._modes: dict[int, str] = {}

    async def start(self) -> None:
        await self.bus.subscribe(self.subject, InboundPolicy, self._on_policy)
        await self.refresh()

    async def refresh(self) -> None:
        try:
            policy = await self.bus.request(
                self.bus.subjects.config_fetch,
                FetchRequest(
                    kind="inbound",
                    namespace=self.settings.namespace,
                    name=self.settings.service,
                    labels=self.settings.labels,
                ),
                InboundPolicy,
            )
        except errors.MeshError as e:
            log.warning("inbound_policy.fetch_failed", error=str(e))
            return
        self.apply(policy)

    async def _on_policy(self, policy: InboundPolicy, _subject: str) -> None:
        self.apply(policy)

    def apply(self, policy: InboundPolicy) -> bool:
        current = self.policy.revision if self.policy else 0
        if policy.revision <= current:
            return False
        try:
            authorizer = Authorizer.build(policy, self.settings.labels)
            authenticator = Authenticator.build(policy, self.settings.labels)
            # resolve the modes of the ports we serve now: a policy that cannot be
            # evaluated is rejected here, not on the first connection
            modes: dict[int, str] = {
                port: effective_mtls(policy.peer_authentication, self.settings.labels, port)
                for port in self._ports()
            }
            limiter = InboundRateLimiter.build(
                policy.rate_limits, self.settings.labels, previous=self.rate_limiter
            )
        except (ValueError, TypeError, KeyError, errors.MeshError) as e:
            self.status = SubscriptionStatus(
                subject=self.subject,
                revision=current,
                state="NACK",
                reason=f"cannot apply inbound policy: {e}",
                rejected_revision=policy.revision,
            )
            log.warning("inbound_policy.rejected", revision=policy.revision, error=str(e))
            self.on_change()
            return False
        self.policy, self.authorizer, self._modes = policy, authorizer, modes
        self.authentication.update(authenticator)
        self.providers = {p.name: p for p in policy.extension_providers}
        self.rate_limiter = limiter
        self.status = SubscriptionStatus(subject=self.subject, revision=policy.revision)
        log.info(
            "inbound_policy.applied",
            revision=policy.revision,
            authorization=len(policy.authorization),
            request_authentication=list(authenticator.policies),
            peer_authentication=len(policy.peer_authentication),
            rate_limits=list(limiter.policies),
            modes=modes,
        )
        self.on_change()
        return True

    def mode(self, port: int) -> str:
        """STRICT / PERMISSIVE / DISABLE for connections to the app's `port`."""
        mode = self._modes.get(port)
        if mode is None:
            peer = self.policy.peer_authentication if self.policy else ()
            mode = effective_mtls(peer, self.settings.labels, port)
            self._modes[port] = mode
        return mode

    def _ports(self) -> list[int]:
        s = self.settings
        return [p for p in (s.app_port, *s.tcp_ports) if p]

    def statuses(self) -> list[SubscriptionStatus]:
        return [self.status]

    def dump(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "revision": self.policy.revision if self.policy else 0,
            "modes": {str(p): self.mode(p) for p in self._ports()},
            "authorization": list(self.authorizer.applied),
            "authorization_dry_run": list(self.authorizer.dry_run),
            "rate_limits": list(self.rate_limiter.policies),
            "request_authentication": list(self.authentication.authenticator.policies),
            "jwks": self.authentication.fetcher.cache.status(),
        }

    async def close(self) -> None:
        """Stop fetching JWKS (the refresher and fetches in flight)."""
        await self.authentication.fetcher.close()
