"""The validated resource envelope shared by every kind, and its Istio-shaped dict form."""

from __future__ import annotations

from typing import Any, NamedTuple

import msgspec

from mesh.resources.meshwork import RateLimitPolicySpec
from mesh.resources.networking import DestinationRuleSpec, GatewaySpec, Model, VirtualServiceSpec
from mesh.resources.security import AuthorizationPolicySpec, PeerAuthenticationSpec
from mesh.resources.service_entry import ServiceEntrySpec

# the typed spec of every registered kind; extend together with `registry.KINDS`
Spec = (
    VirtualServiceSpec
    | DestinationRuleSpec
    | GatewaySpec
    | PeerAuthenticationSpec
    | AuthorizationPolicySpec
    | RateLimitPolicySpec
    | ServiceEntrySpec
)


class Metadata(Model, frozen=True):
    name: str
    # filled with the caller's default namespace at parse time, so never empty after
    namespace: str = ""
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class ResourceKey(NamedTuple):
    """Identity of a resource: what etcd keys and `meshctl get` use."""

    kind: str
    namespace: str
    name: str


class Resource(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel", kw_only=True):
    """A resource document after parsing and validation; `spec` is typed per kind.

    Built only by `parse_resource`, so code holding a Resource never re-validates.
    """

    api_version: str
    kind: str
    metadata: Metadata
    spec: Spec

    @property
    def ref(self) -> ResourceKey:
        return ResourceKey(self.kind, self.metadata.namespace, self.metadata.name)


def to_dict(resource: Resource) -> dict[str, Any]:
    """The Istio-shaped document (camelCase keys, defaults omitted, plain lists).

    Round-trips: `parse_resource(to_dict(r), ...) == r`. Goes through JSON so tuples
    become lists and the result is safe for `yaml.safe_dump` as well as JSON.
    """
    result: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(resource))
    # a registry name `<Kind>.<group>` (registry.KindInfo.written_kind) is written `<Kind>`
    result["kind"] = resource.kind.split(".", 1)[0]
    return result
