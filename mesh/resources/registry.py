"""Registry of the resource kinds the mesh accepts: adding a kind is one entry here.

Each entry names the kind as users type it (`VirtualService`, `virtualservices`,
`vs`), the apiVersions accepted for it, its typed spec and its semantic validator.
Kinds not listed (Sidecar, WorkloadEntry, ...) are rejected at apply time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

from mesh.resources.errors import Issue, ResourceError
from mesh.resources.gateway_api import (
    GATEWAY_API_GROUP,
    GATEWAY_KIND,
    GatewayAPIGatewaySpec,
    GRPCRouteSpec,
    HTTPRouteSpec,
)
from mesh.resources.kubernetes import ServiceSpec, validate_service
from mesh.resources.meshwork import MeshConfigSpec, RateLimitPolicySpec
from mesh.resources.model import Metadata
from mesh.resources.networking import DestinationRuleSpec, GatewaySpec, VirtualServiceSpec
from mesh.resources.security import (
    AuthorizationPolicySpec,
    PeerAuthenticationSpec,
    RequestAuthenticationSpec,
)
from mesh.resources.service_entry import ServiceEntrySpec, validate_service_entry
from mesh.resources.validate import (
    validate_destination_rule,
    validate_gateway,
    validate_virtual_service,
)
from mesh.resources.validate_gateway_api import (
    validate_gateway_api_gateway,
    validate_grpc_route,
    validate_http_route,
)
from mesh.resources.validate_meshwork import validate_mesh_config, validate_rate_limit_policy
from mesh.resources.validate_security import (
    validate_authorization_metadata,
    validate_authorization_policy,
    validate_peer_authentication,
    validate_request_authentication,
)

NETWORKING_GROUP = "networking.istio.io"
NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")
SECURITY_GROUP = "security.istio.io"
SECURITY_VERSIONS = ("v1", "v1beta1")
MESHWORK_GROUP = "meshwork.io"
MESHWORK_VERSIONS = ("v1",)
GATEWAY_API_VERSIONS = ("v1", "v1beta1")
# Kubernetes' core group: its apiVersion is the bare version (`v1`)
CORE_GROUP = ""


class KindInfo(NamedTuple):
    kind: str
    plural: str
    short_names: tuple[str, ...]
    group: str
    versions: tuple[str, ...]
    spec_type: type[Any]
    # (spec of `spec_type`, path of the spec) -> problems; Any because each entry's
    # validator takes its own spec type
    validate: Callable[[Any, str], list[Issue]]
    # kind-specific checks of the metadata (annotations), on top of the shared ones
    validate_metadata: Callable[[Metadata, str], list[Issue]] | None = None

    @property
    def written_kind(self) -> str:
        """The kind as documents write it: a registry name `<Kind>.<group>` (a kind whose
        name another group's kind already has) is written `<Kind>`."""
        return self.kind.split(".", 1)[0]

    @property
    def api_versions(self) -> tuple[str, ...]:
        return tuple(f"{self.group}/{v}" if self.group else v for v in self.versions)


def _entries(*infos: KindInfo) -> Mapping[str, KindInfo]:
    return MappingProxyType({info.kind: info for info in infos})


KINDS: Mapping[str, KindInfo] = _entries(
    KindInfo(
        kind="VirtualService",
        plural="virtualservices",
        short_names=("vs",),
        group=NETWORKING_GROUP,
        versions=NETWORKING_VERSIONS,
        spec_type=VirtualServiceSpec,
        validate=validate_virtual_service,
    ),
    KindInfo(
        kind="DestinationRule",
        plural="destinationrules",
        short_names=("dr",),
        group=NETWORKING_GROUP,
        versions=NETWORKING_VERSIONS,
        spec_type=DestinationRuleSpec,
        validate=validate_destination_rule,
    ),
    KindInfo(
        kind="Gateway",
        plural="gateways",
        short_names=("gw",),
        group=NETWORKING_GROUP,
        versions=NETWORKING_VERSIONS,
        spec_type=GatewaySpec,
        validate=validate_gateway,
    ),
    KindInfo(
        kind="ServiceEntry",
        plural="serviceentries",
        short_names=("se",),
        group=NETWORKING_GROUP,
        versions=NETWORKING_VERSIONS,
        spec_type=ServiceEntrySpec,
        validate=validate_service_entry,
    ),
    KindInfo(
        kind="PeerAuthentication",
        plural="peerauthentications",
        short_names=("pa",),
        group=SECURITY_GROUP,
        versions=SECURITY_VERSIONS,
        spec_type=PeerAuthenticationSpec,
        validate=validate_peer_authentication,
    ),
    KindInfo(
        kind="AuthorizationPolicy",
        plural="authorizationpolicies",
        short_names=("ap",),
        group=SECURITY_GROUP,
        versions=SECURITY_VERSIONS,
        spec_type=AuthorizationPolicySpec,
        validate=validate_authorization_policy,
        validate_metadata=validate_authorization_metadata,
    ),
    KindInfo(
        kind="RequestAuthentication",
        plural="requestauthentications",
        short_names=("ra",),
        group=SECURITY_GROUP,
        versions=SECURITY_VERSIONS,
        spec_type=RequestAuthenticationSpec,
        validate=validate_request_authentication,
    ),
    KindInfo(
        kind="RateLimitPolicy",
        plural="ratelimitpolicies",
        short_names=("rlp",),
        group=MESHWORK_GROUP,
        versions=MESHWORK_VERSIONS,
        spec_type=RateLimitPolicySpec,
        validate=validate_rate_limit_policy,
    ),
    KindInfo(
        kind="MeshConfig",
        plural="meshconfigs",
        short_names=("mc",),
        group=MESHWORK_GROUP,
        versions=MESHWORK_VERSIONS,
        spec_type=MeshConfigSpec,
        validate=validate_mesh_config,
    ),
    KindInfo(
        kind="HTTPRoute",
        plural="httproutes",
        short_names=("hr",),
        group=GATEWAY_API_GROUP,
        versions=GATEWAY_API_VERSIONS,
        spec_type=HTTPRouteSpec,
        validate=validate_http_route,
    ),
    KindInfo(
        kind="GRPCRoute",
        plural="grpcroutes",
        short_names=("gr",),
        group=GATEWAY_API_GROUP,
        versions=GATEWAY_API_VERSIONS,
        spec_type=GRPCRouteSpec,
        validate=validate_grpc_route,
    ),
    KindInfo(
        kind=GATEWAY_KIND,
        plural="gateways",
        short_names=(),
        group=GATEWAY_API_GROUP,
        versions=GATEWAY_API_VERSIONS,
        spec_type=GatewayAPIGatewaySpec,
        validate=validate_gateway_api_gateway,
    ),
    KindInfo(
        kind="Service",
        plural="services",
        short_names=("svc",),
        group=CORE_GROUP,
        versions=("v1",),
        spec_type=ServiceSpec,
        validate=validate_service,
    ),
)


def _aliases() -> Mapping[str, str]:
    table: dict[str, str] = {}
    for info in KINDS.values():
        qualified_only = info.written_kind != info.kind
        for name in (info.written_kind.lower(), info.plural, *info.short_names):
            if not qualified_only:  # a bare `gateway` stays Istio's
                table[name] = info.kind
            # kubectl's fully qualified form: virtualservices.networking.istio.io
            if info.group:
                table[f"{name}.{info.group}"] = info.kind
    return MappingProxyType(table)


_ALIASES = _aliases()


def registry_kind(kind: str, api_version: object) -> str:
    """The registry name of a document's kind: `Gateway` of `gateway.networking.k8s.io/v1`
    is `Gateway.gateway.networking.k8s.io`; any other kind is its own name."""
    if isinstance(api_version, str) and "/" in api_version:
        qualified = f"{kind}.{api_version.rsplit('/', 1)[0]}"
        if qualified in KINDS:
            return qualified
    return kind


def resolve_kind(name: str) -> str:
    """The canonical kind for a name as typed on a command line (`vs`, `Gateways`...)."""
    kind = _ALIASES.get(name.strip().lower())
    if kind is None:
        known = ", ".join(
            f"{i.kind} ({', '.join(i.short_names)})" if i.short_names else i.kind
            for i in KINDS.values()
        )
        raise ResourceError(f"unknown resource kind {name!r}; known kinds: {known}", source="")
    return kind
