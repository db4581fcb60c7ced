"""Small helpers for building Envoy resources as proto3-JSON dicts, parsed into the
typed messages at the end (`parse`), so a misspelt field fails the translation."""

from __future__ import annotations

from typing import Any

# Imported for their side effect: every message type an `Any` below names must be in
# the descriptor pool for `ParseDict` to resolve it.
import envoy.config.trace.v3.opentelemetry_pb2
import envoy.extensions.access_loggers.grpc.v3.als_pb2
import envoy.extensions.access_loggers.stats.v3.stats_pb2
import envoy.extensions.clusters.dynamic_forward_proxy.v3.cluster_pb2
import envoy.extensions.common.dynamic_forward_proxy.v3.dns_cache_pb2
import envoy.extensions.filters.http.dynamic_forward_proxy.v3.dynamic_forward_proxy_pb2
import envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2
import envoy.extensions.filters.http.fault.v3.fault_pb2
import envoy.extensions.filters.http.header_to_metadata.v3.header_to_metadata_pb2
import envoy.extensions.filters.http.jwt_authn.v3.config_pb2
import envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2
import envoy.extensions.filters.http.on_demand.v3.on_demand_pb2
import envoy.extensions.filters.http.rbac.v3.rbac_pb2
import envoy.extensions.filters.http.router.v3.router_pb2
import envoy.extensions.filters.listener.http_inspector.v3.http_inspector_pb2
import envoy.extensions.filters.listener.original_dst.v3.original_dst_pb2
import envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2
import envoy.extensions.filters.network.rbac.v3.rbac_pb2
import envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2
import envoy.extensions.path.match.uri_template.v3.uri_template_match_pb2
import envoy.extensions.request_id.uuid.v3.uuid_pb2
import envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2
import envoy.extensions.tracers.opentelemetry.samplers.v3.parent_based_sampler_pb2
import envoy.extensions.tracers.opentelemetry.samplers.v3.trace_id_ratio_based_sampler_pb2
import envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2
import envoy.extensions.transport_sockets.tls.v3.tls_pb2
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message

Json = dict[str, Any]

_PREFIX = "type.googleapis.com/"
HCM = _PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = _PREFIX + "envoy.extensions.filters.http.router.v3.Router"
FAULT = _PREFIX + "envoy.extensions.filters.http.fault.v3.HTTPFault"
ON_DEMAND = _PREFIX + "envoy.extensions.filters.http.on_demand.v3.OnDemand"
HTTP_RBAC = _PREFIX + "envoy.extensions.filters.http.rbac.v3.RBAC"
HTTP_RBAC_PER_ROUTE = _PREFIX + "envoy.extensions.filters.http.rbac.v3.RBACPerRoute"
NETWORK_RBAC = _PREFIX + "envoy.extensions.filters.network.rbac.v3.RBAC"
LOCAL_RATELIMIT = _PREFIX + "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
TCP_PROXY = _PREFIX + "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS_INSPECTOR = _PREFIX + "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
HTTP_INSPECTOR = _PREFIX + "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"
ORIGINAL_DST = _PREFIX + "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
UPSTREAM_TLS = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
RAW_BUFFER = _PREFIX + "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"
HTTP_PROTOCOL_OPTIONS = _PREFIX + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PREVIOUS_HOSTS = _PREFIX + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
HTTP_GRPC_ACCESS_LOG = _PREFIX + "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
TCP_GRPC_ACCESS_LOG = _PREFIX + "envoy.extensions.access_loggers.grpc.v3.TcpGrpcAccessLogConfig"
STATS_ACCESS_LOG = _PREFIX + "envoy.extensions.access_loggers.stats.v3.Config"
OPENTELEMETRY = _PREFIX + "envoy.config.trace.v3.OpenTelemetryConfig"
_SAMPLERS = _PREFIX + "envoy.extensions.tracers.opentelemetry.samplers.v3."
UUID_REQUEST_ID = _PREFIX + "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig"
PARENT_BASED_SAMPLER = _SAMPLERS + "ParentBasedSamplerConfig"
TRACE_ID_RATIO_SAMPLER = _SAMPLERS + "TraceIdRatioBasedSamplerConfig"
DFP_FILTER = _PREFIX + "envoy.extensions.filters.http.dynamic_forward_proxy.v3.FilterConfig"
DFP_CLUSTER = _PREFIX + "envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig"

# Envoy's name for the HTTP filters, used as keys of `typed_per_filter_config`
FAULT_FILTER = "envoy.filters.http.fault"

# configuration delivered over the ADS stream the bootstrap sets up
ADS: Json = {"ads": {}, "resourceApiVersion": "V3"}


def typed(type_url: str, body: Json | None = None) -> Json:
    """An `Any` in proto3 JSON: the body's fields next to `@type`."""
    return {"@type": type_url, **(body or {})}


def duration(ms: int) -> str:
    """Milliseconds as a proto3-JSON Duration (`1.5s`, `0s`)."""
    seconds, rest = divmod(ms, 1000)
    return f"{seconds}.{rest:03d}s" if rest else f"{seconds}s"


def percent(value: float) -> Json:
    """A percentage in [0, 100] as a FractionalPercent per million (Istio's form, so
    fractions such as 0.1 % survive)."""
    return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def parse(message: type[Message], body: Json) -> Message:
    """The typed message; `json_format.ParseError` means the translator built a field
    that does not exist (a bug here, not bad input)."""
    return json_format.ParseDict(body, message())


def to_dict(message: Message) -> Json:
    """The proto3-JSON form of a message (what Envoy's config dump shows)."""
    return json_format.MessageToDict(message)
