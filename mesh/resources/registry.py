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
    def api_versions(self) -> tuple[str, ...]:
        return tuple(f"{self.group}/{v}" for v in self.versions)


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
)


def _aliases() -> Mapping[str, str]:
    table: dict[str, str] = {}
    for info in KINDS.values():
        for name in (info.kind.lower(), info.plural, *info.short_names):
            table[name] = info.kind
            # kubectl's fully qualified form: virtualservices.networking.istio.io
            table[f"{name}.{info.group}"] = info.kind
    return MappingProxyType(table)


_ALIASES = _aliases()


def resolve_kind(name: str) -> str:
    """The canonical kind for a name as typed on a command line (`vs`, `Gateways`...)."""
    kind = _ALIASES.get(name.strip().lower())
    if kind is None:
        known = ", ".join(f"{i.kind} ({', '.join(i.short_names)})" for i in KINDS.values())
        raise ResourceError(f"unknown resource kind {name!r}; known kinds: {known}", source="")
    return kind
