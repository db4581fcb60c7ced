"""Istio-compatible resource kinds: typed models, YAML loading and validation.

YAML becomes typed, frozen models once, at the edge (`meshctl apply`, the config
service's apply handler); everything downstream (the compiler, `meshctl get`) works
on `Resource` values and never re-validates. Pure: no I/O.

    docs = load_yaml(text, "bookinfo.yaml")
    resources = [parse_resource(d, source="bookinfo.yaml", index=i) for i, d in enumerate(docs)]
    body = to_dict(resources[0])   # what is stored in etcd and shown by `meshctl get -o yaml`
"""

from mesh.resources.durations import parse_duration_ms
from mesh.resources.errors import ResourceError
from mesh.resources.loader import (
    ParsedBatch,
    SourcedDocument,
    load_yaml,
    parse_documents,
    parse_resource,
)
from mesh.resources.meshwork import (
    ClientRefs,
    RateLimitOverride,
    RateLimitPolicySpec,
    RequestRate,
)
from mesh.resources.model import Metadata, Resource, ResourceKey, Spec, to_dict
from mesh.resources.networking import (
    ConnectionPoolSettings,
    ConsistentHashLB,
    Destination,
    DestinationRuleSpec,
    FaultAbort,
    FaultDelay,
    GatewaySpec,
    HeaderOperations,
    Headers,
    HTTPBody,
    HTTPCookie,
    HTTPDirectResponse,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRetry,
    HTTPRewrite,
    HTTPRoute,
    HTTPRouteDestination,
    HTTPSettings,
    LoadBalancerSettings,
    OutlierDetection,
    Percent,
    Port,
    PortSelector,
    Server,
    StringMatch,
    Subset,
    TCPSettings,
    TrafficPolicy,
    VirtualServiceSpec,
)
from mesh.resources.registry import KINDS, KindInfo, resolve_kind
from mesh.resources.security import (
    AuthorizationPolicySpec,
    Condition,
    MutualTLS,
    Operation,
    PeerAuthenticationSpec,
    Rule,
    RuleFrom,
    RuleTo,
    Source,
    WorkloadSelector,
)
from mesh.resources.validate import MESH_GATEWAY

__all__ = [
    "KINDS",
    "MESH_GATEWAY",
    "AuthorizationPolicySpec",
    "ClientRefs",
    "Condition",
    "ConnectionPoolSettings",
    "ConsistentHashLB",
    "Destination",
    "DestinationRuleSpec",
    "FaultAbort",
    "FaultDelay",
    "GatewaySpec",
    "HTTPBody",
    "HTTPCookie",
    "HTTPDirectResponse",
    "HTTPFaultInjection",
    "HTTPMatchRequest",
    "HTTPRedirect",
    "HTTPRetry",
    "HTTPRewrite",
    "HTTPRoute",
    "HTTPRouteDestination",
    "HTTPSettings",
    "HeaderOperations",
    "Headers",
    "KindInfo",
    "LoadBalancerSettings",
    "Metadata",
    "MutualTLS",
    "Operation",
    "OutlierDetection",
    "ParsedBatch",
    "PeerAuthenticationSpec",
    "Percent",
    "Port",
    "PortSelector",
    "RateLimitOverride",
    "RateLimitPolicySpec",
    "RequestRate",
    "Resource",
    "ResourceError",
    "ResourceKey",
    "Rule",
    "RuleFrom",
    "RuleTo",
    "Server",
    "Source",
    "SourcedDocument",
    "Spec",
    "StringMatch",
    "Subset",
    "TCPSettings",
    "TrafficPolicy",
    "VirtualServiceSpec",
    "WorkloadSelector",
    "load_yaml",
    "parse_documents",
    "parse_duration_ms",
    "parse_resource",
    "resolve_kind",
    "to_dict",
]
