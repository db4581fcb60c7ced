"""The inbound listener's request path: identify the caller (its certificate; the end
user's JWT, RequestAuthentication: 401 when invalid), authorize, rate-limit, forward
to the app on localhost.

The caller's identity is the SPIFFE ID of its client certificate (mTLS) and nothing
else: headers claiming an identity (`x-forwarded-client-cert`) are removed and
replaced by the one the handshake proved.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from mesh.compiled import TrafficPolicy
from mesh.hosts import ServiceRef
from mesh.identity import requested_server_name
from mesh.messages import Endpoint
from proxy import cluster_send
from proxy.clusters import Cluster
from proxy.ext_authz import check_custom
from proxy.forward import Outcome, PoolSet, local_reply
from proxy.http import Exchange, Request, ensure_request_id, header_map, strip_hop_by_hop
from proxy.inbound_policy import InboundPolicyFollower
from proxy.peer import Peer, peer_of
from proxy.policy import AuthIdentity, Decision, RequestFacts, original_client
from proxy.policy.ext_authz import with_upstream_headers
from proxy.request_authn import reply_unauthenticated
from proxy.resilience import ratelimit_headers
from proxy.response_flags import ResponseFlag
from proxy.routing import RoundRobinBalancer
from proxy.settings import SidecarSettings
from proxy.stats import ProxyStats

XFCC = "x-forwarded-client-cert"
# Envoy's flag for "no route": a CONNECT request has no path to route (Envoy answers
# 404 to a CONNECT without a `connect_matcher` route), and no listener tunnels CONNECT
NO_ROUTE_FLAG = ResponseFlag.NO_ROUTE_FOUND
# Envoy's flag for a request denied by RBAC (authorization policy)
DENIED_FLAG = ResponseFlag.RBAC_ACCESS_DENIED
# Envoy's flag for a request refused by a (local) rate limit
RATE_LIMITED_FLAG = ResponseFlag.RATE_LIMITED


class InboundHandler:
    def __init__(
        self,
        settings: SidecarSettings,
        app_pools: PoolSet,
        policy: InboundPolicyFollower,
        stats: ProxyStats,
    ):
        self.settings = settings
        self.app_pools = app_pools
        self.policy = policy
        self.stats = stats
        self.app_address = f"{settings.app_host}:{settings.app_port}"
        self.app_cluster = app_cluster(settings.namespace, settings.service, self.app_address)

    async def handle(self, req: Request, ex: Exchange) -> Outcome:
        if self.settings.app_port == 0:
            return await local_reply(
                ex, 503, ResponseFlag.NO_HEALTHY_UPSTREAM, "this sidecar has no app port"
            )
        if req.method == "CONNECT":
            return await local_reply(ex, 404, NO_ROUTE_FLAG, "CONNECT is not routed")
        peer = peer_of(req.ssl_object)
        if not peer.mtls and self.policy.mode(self.settings.app_port) == "STRICT":
            # accepted as plaintext before the mode became STRICT: not any more
            ex.close_after = True
            return await local_reply(
                ex, 403, DENIED_FLAG, "mTLS required: PeerAuthentication mode is STRICT"
            )
        # JWT first (Envoy's jwt_authn runs before RBAC); it may remove the token from
        # the headers or the query (`forwardOriginalToken: false`)
        authentication = self.policy.authentication
        identity = None
        if not authentication.authenticator.empty:  # no coroutine per request otherwise
            verdict = await authentication.authenticate(req)
            if verdict.error:
                return await reply_unauthenticated(req, ex, verdict)
            identity = verdict.identity
        # the engine normalised the path and Host before any handler ran
        # (proxy.http.target): authorized as forwarded
        path = req.path
        authz = self._authorize(req, peer, path, identity)
        shadow = authz.shadow if authz is not None else None
        # the authorizer's headers for the client when it allowed (ext_authz)
        allowed_headers: list[tuple[str, str]] = []
        if authz is not None and authz.custom:
            # CUSTOM first (Istio's order): the external authorizer's denial wins
            refused, checked = await check_custom(
                self.policy.ext_authz,
                self.policy.providers,
                authz.custom,
                authz.custom_policy,
                req,
                ex,
            )
            if refused is not None:
                refused.authz_shadow = shadow
                return refused
            assert checked is not None
            req.headers = with_upstream_headers(req.headers, checked)
            allowed_headers = list(checked.downstream_headers)
        if authz is not None and not authz.allowed:
            self.stats.authz_denied.labels(policy=authz.policy or "none").inc()
            outcome = await local_reply(
                ex, 403, DENIED_FLAG, f"RBAC: access denied ({authz.reason})"
            )
            outcome.authz_shadow = authz.shadow
            return outcome
        limited_headers = None
        limiter = self.policy.rate_limiter
        if limiter:
            # after authorization, as Envoy's filter chain orders them: a denied caller
            # does not spend anyone's tokens
            decision = limiter.check(peer.principal, time.monotonic())
            limited_headers = ratelimit_headers(decision)
            if not decision.allowed:
                outcome = await local_reply(
                    ex,
                    429,
                    RATE_LIMITED_FLAG,
                    f"local rate limit exceeded ({decision.policy}, {decision.scope})",
                    limited_headers,
                )
                outcome.authz_shadow = shadow
                return outcome
        headers = [(n, v) for n, v in strip_hop_by_hop(req.headers, req.upgrade) if n != XFCC]
        headers, _ = ensure_request_id(headers)
        if req.authority and not any(n == "host" for n, _ in headers):
            headers.append(("host", req.authority))
        if peer.mtls:
            headers.append((XFCC, f"By={self.settings.identity};URI={peer.spiffe_id}"))
        outcome = await cluster_send.exchange(
            ex,
            self.app_cluster,
            self.app_pools,
            cluster_send.Request(req.method, path, headers, req.body),
            response_headers=_adding((limited_headers or []) + allowed_headers),
        )
        outcome.authz_shadow = shadow
        return outcome

    def _authorize(
        self, req: Request, peer: Peer, path: str, auth: AuthIdentity | None
    ) -> Decision | None:
        """None when no policy applies (dry-run ones included); else the decision,
        its dry-run shadow counted (`meshwork_proxy_authz_dry_run_total`)."""
        authorizer = self.policy.authorizer
        if authorizer.empty:
            return None
        headers = header_map(req.headers)
        query = path.find("?")
        peer_ip = req.peer[0] if req.peer else ""
        inbound = self.policy.policy
        trusted = inbound.num_trusted_proxies if inbound is not None else 0
        decision = authorizer.decide(
            RequestFacts(
                principal=peer.principal,
                namespace=peer.namespace,
                source_ip=peer_ip,
                method=req.method,
                path=path if query < 0 else path[:query],
                host=req.authority or headers.get("host", ""),
                port=self.settings.app_port,
                headers=headers,
                auth=auth,
                remote_ip=original_client(headers.get("x-forwarded-for", ""), peer_ip, trusted),
                destination_ip=req.local[0] if req.local else "",
                sni=requested_server_name(req.ssl_object),
            )
        )
        if decision.shadow is not None:
            self.stats.count_dry_run("http", decision.shadow)
        return decision


def app_cluster(namespace: str, service: str, address: str) -> Cluster:
    """The app as a cluster of one endpoint (Envoy's `inbound|<port>||` cluster): no
    DestinationRule applies to it, so its breaker has Istio's unlimited defaults and
    there is no outlier detection; requests reach it through the same upstream path as
    any other cluster's (`proxy.cluster_send`)."""
    endpoint = Endpoint(instance=address, address=address)
    balancer = RoundRobinBalancer([endpoint], random.Random(0))
    return Cluster(ServiceRef(namespace, service), "", TrafficPolicy(), balancer)


def _adding(
    extra: list[tuple[str, str]],
) -> Callable[[list[tuple[str, str]]], list[tuple[str, str]]] | None:
    """The upstream answer's headers plus `extra` (rate-limit and ext_authz headers for
    the client); None when there are none."""
    if not extra:
        return None
    return lambda headers: headers + extra
