"""RequestAuthentication -> Envoy's `jwt_authn` HTTP filter, as Istio generates it.

One provider per `jwtRules[]` entry (`origins-<n>`), one rule for every path requiring
any of them or none (`allow_missing`): no token passes, an invalid one is refused 401
with Envoy's `www-authenticate` challenge, as the Python sidecar does
(`proxy.policy.jwt`). Every provider writes the validated payload into dynamic
metadata (`payload`), where RBAC matches `requestPrincipals` and `request.auth.*`
(`rbac`). Empty locations are Envoy's defaults, which are Istio's
(`Authorization: Bearer`, `access_token`).

Keys: inline `jwks` as `local_jwks`; `jwksUri` as `remote_jwks` fetched by Envoy over
a cluster of its own (`jwks|<host>|<port>`, TLS verified against `jwks_ca_file` for
https), cached 10 minutes and refetched asynchronously (`async_fetch`), as the Python
`JwksCache` refreshes on schedule.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping, Sequence

from mesh.compiled import InboundPolicy, JwtRule, RequestAuthn

from .model import TranslationError
from .protos import Json, duration, typed

JWT_AUTHN = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
JWT_FILTER = "envoy.filters.http.jwt_authn"
PAYLOAD_KEY = "payload"
CLOCK_SKEW_S = 60
JWKS_CACHE_S = 600


def selected(policy: InboundPolicy | None, labels: Mapping[str, str]) -> list[RequestAuthn]:
    if policy is None:
        return []
    return [
        p
        for p in policy.request_authentication
        if all(labels.get(k) == v for k, v in p.selector.items())
    ]


def issuers(authns: Sequence[RequestAuthn]) -> tuple[str, ...]:
    return tuple(sorted({rule.issuer for a in authns for rule in a.rules}))


def jwt_authn_filters(
    authns: Sequence[RequestAuthn], ca_file: str
) -> tuple[list[Json], dict[str, Json]]:
    """The filter (none without rules) and the clusters its remote JWKS need."""
    providers: dict[str, Json] = {}
    clusters: dict[str, Json] = {}
    for authn in authns:
        for rule in authn.rules:
            name = f"origins-{len(providers)}"
            providers[name] = _provider(authn, rule, ca_file, clusters)
    if not providers:
        return [], {}
    requirements: list[Json] = [{"providerName": name} for name in providers]
    requirements.append({"allowMissing": {}})
    body: Json = {
        "providers": providers,
        "rules": [
            {"match": {"prefix": "/"}, "requires": {"requiresAny": {"requirements": requirements}}}
        ],
    }
    return [{"name": JWT_FILTER, "typedConfig": typed(JWT_AUTHN, body)}], clusters


def _provider(authn: RequestAuthn, rule: JwtRule, ca_file: str, clusters: dict[str, Json]) -> Json:
    provider: Json = {
        "issuer": rule.issuer,
        "forward": rule.forward_original_token,
        "payloadInMetadata": PAYLOAD_KEY,
        "clockSkewSeconds": CLOCK_SKEW_S,
    }
    if rule.audiences:
        provider["audiences"] = list(rule.audiences)
    if rule.jwks:
        provider["localJwks"] = {"inlineString": rule.jwks}
    else:
        cluster_name, cluster = _jwks_cluster(authn, rule.jwks_uri, ca_file)
        clusters[cluster_name] = cluster
        provider["remoteJwks"] = {
            "httpUri": {
                "uri": rule.jwks_uri,
                "cluster": cluster_name,
                "timeout": duration(rule.timeout_ms),
            },
            "cacheDuration": f"{JWKS_CACHE_S}s",
            "asyncFetch": {},
        }
    if rule.from_headers:
        provider["fromHeaders"] = [
            {"name": h.name, **({"valuePrefix": h.prefix} if h.prefix else {})}
            for h in rule.from_headers
        ]
    if rule.from_params:
        provider["fromParams"] = list(rule.from_params)
    if rule.from_cookies:
        provider["fromCookies"] = list(rule.from_cookies)
    if rule.output_payload_to_header:
        provider["forwardPayloadHeader"] = rule.output_payload_to_header
    if rule.output_claim_to_headers:
        provider["claimToHeaders"] = [
            {"headerName": c.header, "claimName": c.claim} for c in rule.output_claim_to_headers
        ]
    return provider


def _jwks_cluster(authn: RequestAuthn, uri: str, ca_file: str) -> tuple[str, Json]:
    parsed = urllib.parse.urlsplit(uri)
    host = parsed.hostname or ""
    https = parsed.scheme == "https"
    try:
        port = parsed.port or (443 if https else 80)
    except ValueError:
        port = 0
    if not host or not port:
        raise TranslationError(
            f"RequestAuthentication {authn.namespace}/{authn.name}",
            "jwtRules[].jwksUri",
            uri,
            "no host and port to fetch the keys from",
        )
    name = f"jwks|{host}|{port}"
    try:
        ipaddress.ip_address(host)
        kind = "STATIC"
    except ValueError:
        kind = "LOGICAL_DNS"
    cluster: Json = {
        "name": name,
        "type": kind,
        "connectTimeout": "5s",
        "dnsLookupFamily": "V4_PREFERRED",
        "loadAssignment": {
            "clusterName": name,
            "endpoints": [
                {
                    "lbEndpoints": [
                        {
                            "endpoint": {
                                "address": {"socketAddress": {"address": host, "portValue": port}}
                            }
                        }
                    ]
                }
            ],
        },
    }
    if https:
        cluster["transportSocket"] = {
            "name": "envoy.transport_sockets.tls",
            "typedConfig": typed(
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                {
                    "sni": host,
                    "commonTlsContext": {
                        "validationContext": {
                            "trustedCa": {"filename": ca_file},
                            "matchTypedSubjectAltNames": [
                                {
                                    "sanType": "IP_ADDRESS" if kind == "STATIC" else "DNS",
                                    "matcher": {"exact": host},
                                }
                            ],
                        }
                    },
                },
            ),
        }
    return name, cluster
