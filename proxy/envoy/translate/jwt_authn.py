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
`JwksCache` refreshes on schedule. Neither (OIDC discovery): Envoy cannot discover, so
the agent reads the issuer's OpenID configuration (`discovered`, from the view) and
the provider fetches the `jwks_uri` it names; until then, or while the issuer cannot
be reached, the provider holds `UNUSABLE_JWKS`, a key nobody can sign for, so its
tokens get 401 (Istio inlines such a key set when istiod cannot resolve the keys).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import urllib.parse
from collections.abc import Mapping, Sequence

import msgspec
from cryptography.hazmat.primitives.asymmetric import ec

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


def _unusable_jwks() -> str:
    """A key set of one EC P-256 public key whose private half is dropped at once (made
    per process, never a published example key): it validates no token."""
    private = ec.generate_private_key(ec.SECP256R1())
    numbers = private.public_key().public_numbers()

    def b64(n: int) -> str:
        return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()

    key = {"kty": "EC", "crv": "P-256", "kid": "meshwork-unresolved"}
    return json.dumps({"keys": [{**key, "x": b64(numbers.x), "y": b64(numbers.y)}]})


UNUSABLE_JWKS = _unusable_jwks()


def discovery_uris(authns: Sequence[RequestAuthn]) -> set[str]:
    """The OpenID configuration URLs the agent must read for these rules."""
    return {r.key_uri for a in authns for r in a.rules if not r.jwks and not r.jwks_uri}


def jwt_authn_filters(
    authns: Sequence[RequestAuthn], ca_file: str, discovered: Mapping[str, str] | None = None
) -> tuple[list[Json], dict[str, Json]]:
    """The filter (none without rules) and the clusters its remote JWKS need."""
    providers: dict[str, Json] = {}
    clusters: dict[str, Json] = {}
    for authn in authns:
        for rule in authn.rules:
            name = f"origins-{len(providers)}"
            if not rule.jwks and not rule.jwks_uri:
                found = (discovered or {}).get(rule.key_uri)
                rule = msgspec.structs.replace(
                    rule, jwks_uri=found or "", jwks="" if found else UNUSABLE_JWKS
                )
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
