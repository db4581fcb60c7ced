"""Semantic validation of the `meshwork.io` kinds (see `meshwork` for their semantics).

RateLimitPolicy follows Linkerd's HTTPLocalRateLimitPolicy rules (no `identity` or
override rate above `total`) and adds what an attached policy needs to mean something:
at least one limit, every override naming principals, each principal in one override
only, principals in Istio's form.
"""

from __future__ import annotations

import re

from mesh.resources import checks
from mesh.resources.durations import parse_duration_ms
from mesh.resources.errors import Issue, field, item, key, required
from mesh.resources.meshwork import (
    ExtAuthzGrpc,
    ExtAuthzHttp,
    MeshConfigSpec,
    RateLimitPolicySpec,
    RequestBodyInCheck,
    RequestRate,
)

# a SPIFFE trust domain name (as `mesh.identity` accepts it)
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")


def _trust_domain(name: str) -> str | None:
    if not _TRUST_DOMAIN.fullmatch(name):
        return (
            "must be a SPIFFE trust domain (lower-case letters, digits, '.', '-', '_'), "
            f"got {name!r}"
        )
    return None


# Istio's principal form, as AuthorizationPolicy uses it and the sidecar reports it
_PRINCIPAL = re.compile(r"[^/\s]+/ns/[^/\s]+/sa/[^/\s]+")
# a bucket holds one second's worth: keep it a sane allocation
MAX_RPS = 1_000_000
MAX_TRUSTED_PROXIES = 32


def validate_rate_limit_policy(spec: RateLimitPolicySpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    if spec.selector is not None:
        labels_path = field(field(path, "selector"), "matchLabels")
        for name, value in spec.selector.match_labels.items():
            problem = checks.label_key(name) or checks.label_value(value)
            if problem is not None:
                out.append(Issue(key(labels_path, name), problem))
    if spec.total is None and spec.identity is None and not spec.overrides:
        out.append(Issue(path, "must set at least one of total, identity or overrides"))
    total = _rate(spec.total, field(path, "total"), out)
    identity = _rate(spec.identity, field(path, "identity"), out)
    total_path = field(path, "total.requestsPerSecond")
    if total is not None and identity is not None and identity > total:
        out.append(
            Issue(
                field(path, "identity.requestsPerSecond"),
                f"must not be greater than {total_path} ({total}), got {identity}",
            )
        )
    seen: dict[str, str] = {}
    for i, override in enumerate(spec.overrides):
        o_path = item(field(path, "overrides"), i)
        rps_path = field(o_path, "requestsPerSecond")
        rps = _requests_per_second(override.requests_per_second, rps_path, out)
        if total is not None and rps is not None and rps > total:
            out.append(
                Issue(rps_path, f"must not be greater than {total_path} ({total}), got {rps}")
            )
        principals_path = field(field(o_path, "clientRefs"), "principals")
        principals = override.client_refs.principals if override.client_refs else ()
        if not principals:
            out.append(Issue(principals_path, "must list at least one principal"))
        for j, principal in enumerate(principals):
            p_path = item(principals_path, j)
            problem = _principal(principal)
            if problem is not None:
                out.append(Issue(p_path, problem))
            elif principal in seen:
                out.append(Issue(p_path, f"{principal!r} is already listed at {seen[principal]}"))
            else:
                seen[principal] = p_path
    return out


def _rate(rate: RequestRate | None, path: str, out: list[Issue]) -> int | None:
    if rate is None:
        return None
    return _requests_per_second(rate.requests_per_second, field(path, "requestsPerSecond"), out)


def _requests_per_second(value: int | None, path: str, out: list[Issue]) -> int | None:
    if value is None:
        out.append(required(path))
        return None
    if not 1 <= value <= MAX_RPS:
        out.append(Issue(path, f"must be between 1 and {MAX_RPS}, got {value}"))
        return None
    return value


def _principal(value: str) -> str | None:
    if value.startswith("spiffe://"):
        return (
            f"must be Istio's principal form without spiffe:// "
            f"(e.g. {value.removeprefix('spiffe://')!r}), got {value!r}"
        )
    if not _PRINCIPAL.fullmatch(value):
        return (
            "must be a principal <trust-domain>/ns/<namespace>/sa/<service-account> "
            f"(e.g. 'cluster.local/ns/default/sa/reviews'), got {value!r}"
        )
    return None


OUTBOUND_MODES = ("REGISTRY_ONLY", "ALLOW_ANY")


def validate_mesh_config(spec: MeshConfigSpec, path: str = "spec") -> list[Issue]:
    out: list[Issue] = []
    if spec.outbound_traffic_policy is not None:
        mode = spec.outbound_traffic_policy.mode
        mode_path = field(path, "outboundTrafficPolicy.mode")
        if mode is None:
            out.append(required(mode_path))
        elif mode not in OUTBOUND_MODES:
            out.append(
                Issue(mode_path, f"must be one of {', '.join(OUTBOUND_MODES)}, got {mode!r}")
            )
    topology = spec.default_config.gateway_topology if spec.default_config else None
    if topology is not None and topology.num_trusted_proxies is not None:
        hops = topology.num_trusted_proxies
        if not 0 <= hops <= MAX_TRUSTED_PROXIES:
            out.append(
                Issue(
                    field(path, "defaultConfig.gatewayTopology.numTrustedProxies"),
                    f"must be between 0 and {MAX_TRUSTED_PROXIES}, got {hops}",
                )
            )
    if spec.trust_domain and (problem := _trust_domain(spec.trust_domain)) is not None:
        out.append(Issue(field(path, "trustDomain"), problem))
    for i, alias in enumerate(spec.trust_domain_aliases):
        if (problem := _trust_domain(alias)) is not None:
            out.append(Issue(item(field(path, "trustDomainAliases"), i), problem))
    seen: dict[str, str] = {}
    providers_path = field(path, "extensionProviders")
    for i, provider in enumerate(spec.extension_providers):
        p_path = item(providers_path, i)
        name_path = field(p_path, "name")
        if not provider.name:
            out.append(required(name_path))
        elif provider.name in seen:
            out.append(
                Issue(name_path, f"{provider.name!r} is already defined at {seen[provider.name]}")
            )
        else:
            seen[provider.name] = name_path
        http = provider.envoy_ext_authz_http
        grpc = provider.envoy_ext_authz_grpc
        if http is not None and grpc is not None:
            out.append(
                Issue(
                    field(p_path, "envoyExtAuthzGrpc"),
                    "a provider is either envoyExtAuthzHttp or envoyExtAuthzGrpc, not both",
                )
            )
        elif http is not None:
            _ext_authz_http(http, field(p_path, "envoyExtAuthzHttp"), out)
        elif grpc is not None:
            _ext_authz_grpc(grpc, field(p_path, "envoyExtAuthzGrpc"), out)
        else:
            out.append(
                Issue(
                    p_path,
                    "required: envoyExtAuthzHttp or envoyExtAuthzGrpc "
                    "(the only extension provider kinds supported)",
                )
            )
    return out


# Envoy's default `with_request_body.max_request_bytes` cap we accept: the body is
# buffered in the sidecar before the check
MAX_CHECK_BODY_BYTES = 1024 * 1024


def _ext_authz_grpc(grpc: ExtAuthzGrpc, path: str, out: list[Issue]) -> None:
    _service_port_timeout_status(
        grpc.service, grpc.port, grpc.timeout, grpc.status_on_error, path, out
    )
    _body_in_check(grpc.include_request_body_in_check, path, out)


def _body_in_check(body: RequestBodyInCheck | None, path: str, out: list[Issue]) -> None:
    max_path = field(field(path, "includeRequestBodyInCheck"), "maxRequestBytes")
    if body is None:
        return
    if body.max_request_bytes is None:
        out.append(required(max_path))
    elif not 1 <= body.max_request_bytes <= MAX_CHECK_BODY_BYTES:
        out.append(
            Issue(
                max_path,
                f"must be between 1 and {MAX_CHECK_BODY_BYTES}, got {body.max_request_bytes}",
            )
        )


def _ext_authz_http(http: ExtAuthzHttp, path: str, out: list[Issue]) -> None:
    _service_port_timeout_status(
        http.service, http.port, http.timeout, http.status_on_error, path, out
    )
    _body_in_check(http.include_request_body_in_check, path, out)
    if http.path_prefix and not http.path_prefix.startswith("/"):
        out.append(
            Issue(field(path, "pathPrefix"), f"must start with '/', got {http.path_prefix!r}")
        )
    for name in (
        "includeRequestHeadersInCheck",
        "headersToUpstreamOnAllow",
        "headersToDownstreamOnDeny",
        "headersToDownstreamOnAllow",
    ):
        values = {
            "includeRequestHeadersInCheck": http.include_request_headers_in_check,
            "headersToUpstreamOnAllow": http.headers_to_upstream_on_allow,
            "headersToDownstreamOnDeny": http.headers_to_downstream_on_deny,
            "headersToDownstreamOnAllow": http.headers_to_downstream_on_allow,
        }[name]
        for j, header in enumerate(values):
            problem = checks.header_name(header)
            if problem is not None:
                out.append(Issue(item(field(path, name), j), problem))


def _service_port_timeout_status(
    service: str,
    port: int | str | None,
    timeout: str | None,
    status_on_error: str,
    path: str,
    out: list[Issue],
) -> None:
    """The fields both provider kinds share."""
    service_path = field(path, "service")
    if not service:
        out.append(required(service_path))
    else:
        problem = checks.host(service, wildcard=False)
        if problem is not None:
            out.append(Issue(service_path, problem))
    port_path = field(path, "port")
    if port is None:
        out.append(required(port_path))
    elif isinstance(port, str) and not (port.isascii() and port.isdigit()):
        out.append(Issue(port_path, f"must be a port number, got {port!r}"))
    elif (problem := checks.port(int(port))) is not None:
        out.append(Issue(port_path, problem))
    if timeout is not None:
        timeout_path = field(path, "timeout")
        try:
            if parse_duration_ms(timeout) <= 0:
                out.append(Issue(timeout_path, f"must be positive, got {timeout!r}"))
        except ValueError as e:
            out.append(Issue(timeout_path, str(e)))
    if status_on_error and not (
        status_on_error.isascii()
        and status_on_error.isdigit()
        and 200 <= int(status_on_error) <= 599
    ):
        out.append(
            Issue(
                field(path, "statusOnError"),
                f"must be an HTTP status code (200-599), got {status_on_error!r}",
            )
        )
