"""The ingress gateway's request policy: RequestAuthentication (JWT), then
AuthorizationPolicy (CUSTOM's external authorizer first), for the policies selecting
the gateway workload. Istio applies both to `istio-ingressgateway` like to any
workload; the gateway is the common place for JWT. The gateway follows its own
service's inbound policy for them (`InboundPolicyFollower`), and `RouteHandler` asks
`admit` before routing.

Callers of the gateway are outside the mesh: no peer certificate, so `principals`
and `namespaces` never match there; `requestPrincipals`, `request.auth.*`, `ipBlocks`,
paths, hosts and headers do.
"""

from __future__ import annotations

from mesh.identity import requested_server_name
from proxy.ext_authz import check_custom
from proxy.forward import local_reply
from proxy.http import Exchange, Request, header_map
from proxy.inbound_policy import InboundPolicyFollower
from proxy.outbound import ADMITTED, Admitted
from proxy.policy import RequestFacts, original_client
from proxy.policy.ext_authz import with_upstream_headers
from proxy.request_authn import reply_unauthenticated
from proxy.response_flags import ResponseFlag
from proxy.stats import ProxyStats

DENIED_FLAG = ResponseFlag.RBAC_ACCESS_DENIED


class GatewayAdmission:
    def __init__(self, policy: InboundPolicyFollower, stats: ProxyStats, port: int) -> None:
        self.policy = policy
        self.stats = stats
        self.port = port

    async def admit(self, req: Request, ex: Exchange) -> Admitted:
        verdict = await self.policy.authentication.authenticate(req)
        if verdict.error:
            return Admitted(await reply_unauthenticated(req, ex, verdict))
        authorizer = self.policy.authorizer
        if authorizer.empty:
            return ADMITTED
        headers = header_map(req.headers)
        peer_ip = req.peer[0] if req.peer else ""
        trusted = self.policy.policy.num_trusted_proxies if self.policy.policy else 0
        decision = authorizer.decide(
            RequestFacts(
                principal="",
                namespace="",
                source_ip=peer_ip,
                method=req.method,
                path=req.path.partition("?")[0],
                host=req.authority or headers.get("host", ""),
                # the listener's port as bound (the setting may be 0: any free port)
                port=req.local[1] if req.local else self.port,
                headers=headers,
                auth=verdict.identity,
                remote_ip=original_client(headers.get("x-forwarded-for", ""), peer_ip, trusted),
                destination_ip=req.local[0] if req.local else "",
                sni=requested_server_name(req.ssl_object),
            )
        )
        if decision.shadow is not None:
            self.stats.count_dry_run("http", decision.shadow)
        client_headers: tuple[tuple[str, str], ...] = ()
        if decision.custom:
            # CUSTOM first (Istio's order): the external authorizer's denial wins
            refused, checked = await check_custom(
                self.policy.ext_authz,
                self.policy.providers,
                decision.custom,
                decision.custom_policy,
                req,
                ex,
            )
            if refused is not None:
                return Admitted(refused)
            assert checked is not None
            req.headers = with_upstream_headers(req.headers, checked)
            client_headers = checked.downstream_headers
        if decision.allowed:
            return Admitted(client_headers=client_headers)
        self.stats.authz_denied.labels(policy=decision.policy or "none").inc()
        outcome = await local_reply(
            ex, 403, DENIED_FLAG, f"RBAC: access denied ({decision.reason})"
        )
        outcome.authz_shadow = decision.shadow
        return Admitted(outcome)
