"""TLS transport sockets referencing the SDS secrets by name over ADS, so a rotated
certificate or trust bundle reaches Envoy without any listener or cluster change."""

from __future__ import annotations

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from proxy.envoy.resources import TRUST_BUNDLE, WORKLOAD_CERT

from .model import TranslationError
from .protos import ADS, DOWNSTREAM_TLS, RAW_BUFFER, UPSTREAM_TLS, Json, parse, typed

# What a sidecar's inbound listener offers over mTLS (the Python sidecars offer the
# same). Upstream contexts name no ALPN of their own: Envoy offers the protocol it
# chose for the request (`clusters.UPSTREAM_PROTOCOL`) as its ALPN fallback.
MESH_ALPN = ["h2", "http/1.1"]
# TLS 1.3 only, both ways, as the Python sidecars (`mesh.identity._base_context`):
# Envoy's upstream default stops at TLS 1.2, which a Python sidecar refuses
MESH_TLS_PARAMS: Json = {
    "tlsMinimumProtocolVersion": "TLSv1_3",
    "tlsMaximumProtocolVersion": "TLSv1_3",
}


def _certificate() -> list[Json]:
    return [{"name": WORKLOAD_CERT, "sdsConfig": ADS}]


def _validation(san_matchers: list[Json]) -> Json:
    default: Json = {}
    if san_matchers:
        default["matchTypedSubjectAltNames"] = san_matchers
    return {
        "defaultValidationContext": default,
        "validationContextSdsSecretConfig": {"name": TRUST_BUNDLE, "sdsConfig": ADS},
    }


def upstream_mtls(identity: str, alpn: list[str] | None) -> Json:
    """mTLS towards one peer: our workload certificate, the peer's chain checked
    against the trust bundle and its URI SAN exactly `identity` (what
    `identity.check_peer` checks in the Python sidecar)."""
    common: Json = {
        "tlsParams": MESH_TLS_PARAMS,
        "tlsCertificateSdsSecretConfigs": _certificate(),
        "combinedValidationContext": _validation(
            [{"sanType": "URI", "matcher": {"exact": identity}}]
        ),
    }
    if alpn:
        common["alpnProtocols"] = alpn
    return {
        "name": "envoy.transport_sockets.tls",
        "typedConfig": typed(UPSTREAM_TLS, {"commonTlsContext": common}),
    }


def downstream_mtls(trust_domain: str, alpn: list[str] | None) -> Json:
    """The server side: a client certificate is required and must chain to the trust
    bundle and name a SPIFFE ID of our trust domain."""
    common: Json = {
        "tlsParams": MESH_TLS_PARAMS,
        "tlsCertificateSdsSecretConfigs": _certificate(),
        "combinedValidationContext": _validation(
            [{"sanType": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}]
        ),
    }
    if alpn:
        common["alpnProtocols"] = alpn
    return {
        "name": "envoy.transport_sockets.tls",
        "typedConfig": typed(
            DOWNSTREAM_TLS, {"commonTlsContext": common, "requireClientCertificate": True}
        ),
    }


def raw_buffer() -> Json:
    return {"name": "envoy.transport_sockets.raw_buffer", "typedConfig": typed(RAW_BUFFER)}


def tls_secrets(
    cert_chain_pem: str, private_key_pem: str, trust_bundle_pem: str
) -> dict[str, secret_pb2.Secret]:
    """The SDS secrets every TLS context here names: the workload certificate
    (`WORKLOAD_CERT`) and the trust bundle (`TRUST_BUNDLE`, every root in force)."""
    for what, text in (
        ("cert_chain_pem", cert_chain_pem),
        ("private_key_pem", private_key_pem),
        ("trust_bundle_pem", trust_bundle_pem),
    ):
        if "-----BEGIN " not in text:
            raise TranslationError("secrets", what, "<not shown>", "not a PEM document")
    cert = parse(
        secret_pb2.Secret,
        {
            "name": WORKLOAD_CERT,
            "tlsCertificate": {
                "certificateChain": {"inlineString": cert_chain_pem},
                "privateKey": {"inlineString": private_key_pem},
            },
        },
    )
    bundle = parse(
        secret_pb2.Secret,
        {
            "name": TRUST_BUNDLE,
            "validationContext": {"trustedCa": {"inlineString": trust_bundle_pem}},
        },
    )
    return {WORKLOAD_CERT: cert, TRUST_BUNDLE: bundle}  # type: ignore[dict-item]
