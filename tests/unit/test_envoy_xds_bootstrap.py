"""The bootstrap: a valid Envoy Bootstrap message, ADS over the sidecar's socket."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.resource_monitors.downstream_connections.v3 import (  # noqa: F401
    downstream_connections_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from proxy.envoy.bootstrap import (
    LISTENER_SOCKETS,
    XDS_CLUSTER,
    BootstrapOptions,
    bootstrap_digest,
    bootstrap_json,
    build_bootstrap,
)


def options(**overrides: object) -> BootstrapOptions:
    base: dict[str, object] = dict(
        node_id="sidecar~10.0.0.7~reviews-v1-abc", cluster="reviews",
        xds_socket=Path("/run/mesh/reviews/xds.sock"), admin_port=15000,
    )  # fmt: skip
    return BootstrapOptions(**{**base, **overrides})  # type: ignore[arg-type]


def as_message(bootstrap: dict) -> bootstrap_pb2.Bootstrap:
    return json_format.Parse(bootstrap_json(bootstrap), bootstrap_pb2.Bootstrap())


def test_bootstrap_is_an_envoy_bootstrap_with_ads_over_the_socket():
    message = as_message(build_bootstrap(options()))
    assert (message.node.id, message.node.cluster) == ("sidecar~10.0.0.7~reviews-v1-abc", "reviews")
    ads = message.dynamic_resources.ads_config
    assert ads.api_type == ads.GRPC and ads.grpc_services[0].envoy_grpc.cluster_name == XDS_CLUSTER
    assert message.dynamic_resources.lds_config.HasField("ads")
    assert message.dynamic_resources.cds_config.HasField("ads")
    [xds] = message.static_resources.clusters
    address = xds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert address.pipe.path == "/run/mesh/reviews/xds.sock"
    assert (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        in xds.typed_extension_protocol_options
    )
    admin = message.admin.address.socket_address
    assert (admin.address, admin.port_value) == ("127.0.0.1", 15000)
    assert message.overload_manager.resource_monitors[0].name.endswith("max_connections")


def test_access_log_service_gets_its_own_pipe_cluster():
    message = as_message(
        build_bootstrap(options(access_log_cluster="als", access_log_socket=Path("/run/als.sock")))
    )
    names = [c.name for c in message.static_resources.clusters]
    assert names == [XDS_CLUSTER, "als"]
    als = message.static_resources.clusters[1]
    assert (
        als.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path
        == "/run/als.sock"
    )


def test_the_tracer_exports_on_its_interval_not_every_five_spans():
    """Envoy's OpenTelemetry tracer exports when a worker holds `min_flush_spans`
    (Envoy's default 5) or on its timer: the static runtime raises the first, so at a
    few sampled requests a second the agent takes one export per interval
    (docs/architecture.md §7), and says nothing of tracing without a receiver."""
    traced = options(tracing_cluster="otel", tracing_socket=Path("/run/traces.sock"))
    [static, _admin] = as_message(build_bootstrap(traced)).layered_runtime.layers
    fields = static.static_layer.fields
    assert fields["tracing.opentelemetry.flush_interval_ms"].number_value == 1_000
    assert fields["tracing.opentelemetry.min_flush_spans"].number_value == 256
    untraced = as_message(build_bootstrap(options())).layered_runtime.layers[0]
    assert not untraced.static_layer.fields


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"node_id": ""}, "node_id is empty"),
        ({"cluster": ""}, "cluster"),
        ({"admin_port": 0}, "admin_port 0 is not a TCP port"),
        ({"access_log_cluster": "als"}, "go together"),
        ({"max_downstream_connections": 0}, "max_downstream_connections"),
        ({"tracing_min_flush_spans": 0}, "tracing_min_flush_spans must be positive"),
    ],
)
def test_bad_options_are_refused_naming_the_field(overrides: dict, error: str):
    with pytest.raises(ValueError, match=error):
        options(**overrides)


def test_digest_identifies_the_bootstrap():
    assert bootstrap_digest(build_bootstrap(options())) == bootstrap_digest(
        build_bootstrap(options())
    )
    assert bootstrap_digest(build_bootstrap(options())) != bootstrap_digest(
        build_bootstrap(options(admin_port=15001))
    )


def test_the_bootstrap_says_its_listeners_bind_without_reuse_port():
    """An Envoy left running by a sidecar from before listeners stopped using
    SO_REUSEPORT must not be adopted (Envoy NACKs a change of reuse port on update):
    the bootstrap, whose digest decides adoption, names the listener socket kind."""
    key, value = LISTENER_SOCKETS
    message = as_message(build_bootstrap(options(metadata=(("extra", "kept"),))))
    assert message.node.metadata[key] == value
    assert message.node.metadata["extra"] == "kept"
    earlier = build_bootstrap(options())
    del earlier["node"]["metadata"][key]  # what a sidecar before this change wrote
    assert bootstrap_digest(earlier) != bootstrap_digest(build_bootstrap(options()))
