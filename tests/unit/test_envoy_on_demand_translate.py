"""On-demand translation (`ProxyNode.on_demand`) and the VHDS answer the agent builds:
the outbound route configuration names VHDS and no virtual host, each destination's
virtual host is served by name, and requested hosts map to them as aliases."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2

from proxy.dataplane.envoy_view import vhds_answer, vhds_fqdn, vhds_host
from proxy.envoy.resources import XdsResources
from proxy.envoy.translate import MeshView, translate
from proxy.envoy.translate.protos import to_dict
from tests.unit.test_envoy_translate_golden import (
    RATINGS,
    REVIEWS,
    ratings_endpoints,
    reviews_endpoints,
    sidecar,
)

VIEW = MeshView(
    destinations={REVIEWS: (None, reviews_endpoints()), RATINGS: (None, ratings_endpoints())}
)


def outbound_filters(resources: XdsResources) -> list[str]:
    listener = to_dict(resources.listeners["outbound_http"])
    hcm = listener["filterChains"][0]["filters"][-1]["typedConfig"]
    return [f["name"] for f in hcm["httpFilters"]]


def test_on_demand_route_config_names_vhds_and_holds_no_virtual_host() -> None:
    out = translate(sidecar(on_demand=True), VIEW)
    config = to_dict(out.routes["outbound_http"])
    assert "virtualHosts" not in config  # no catch-all either: Envoy must ask
    source = config["vhds"]["configSource"]["apiConfigSource"]
    assert source["apiType"] == "DELTA_GRPC"
    assert source["grpcServices"] == [{"envoyGrpc": {"clusterName": "xds-grpc"}}]
    assert sorted(out.virtual_hosts) == [f"outbound_http/{RATINGS}", f"outbound_http/{REVIEWS}"]
    reviews = to_dict(out.virtual_hosts[f"outbound_http/{REVIEWS}"])
    assert "reviews" in reviews["domains"] and REVIEWS in reviews["domains"]
    # the on_demand filter asks before anything routes
    filters = outbound_filters(out)
    assert filters[0] == "envoy.filters.http.on_demand"
    assert filters[-1] == "envoy.filters.http.router"
    # the clusters are there all the same (pushed before the virtual host is answered)
    assert f"outbound|0||{REVIEWS}" in out.clusters


def test_default_translation_is_unchanged_by_the_option() -> None:
    out = translate(sidecar(), VIEW)
    config = to_dict(out.routes["outbound_http"])
    assert "vhds" not in config and out.virtual_hosts == {}
    names = [vh["name"] for vh in config["virtualHosts"]]
    assert names == [RATINGS, REVIEWS, "unknown_host"]
    assert "envoy.filters.http.on_demand" not in outbound_filters(out)


def test_vhds_answer_maps_requested_hosts_to_virtual_hosts_as_aliases() -> None:
    out = translate(sidecar(on_demand=True), VIEW)
    details = "details.default.svc.cluster.local"
    requested = {
        "outbound_http/reviews:9080": REVIEWS,
        "outbound_http/reviews.default.svc.cluster.local": REVIEWS,
        "outbound_http/details:9080": details,  # no such service (yet)
        "outbound_http/details.default": details,
        "outbound_http/*.example.com": "",
    }
    resources, absent = vhds_answer(out.virtual_hosts, requested)
    by_name = {r.name: r for r in resources}
    assert by_name[f"outbound_http/{REVIEWS}"].aliases == {
        "outbound_http/reviews:9080",
        "outbound_http/reviews.default.svc.cluster.local",
    }
    assert by_name[f"outbound_http/{RATINGS}"].aliases == frozenset()
    # an unknown host gets the Python proxy's answer, 502, under the service's name
    unknown = by_name[f"outbound_http/{details}"]
    assert unknown.aliases == {"outbound_http/details:9080", "outbound_http/details.default"}
    vhost = route_components_pb2.VirtualHost.FromString(unknown.value)
    assert sorted(vhost.domains) == ["details", "details.default"]
    assert vhost.routes[0].direct_response.status == 502
    assert absent == {"outbound_http/*.example.com"}


def test_vhds_fqdn_resolves_hosts_as_the_python_proxy_does() -> None:
    assert vhds_fqdn("outbound_http/reviews:9080", "default") == REVIEWS
    assert vhds_fqdn("outbound_http/Reviews.Default", "other") == REVIEWS
    assert vhds_fqdn("outbound_http/api.example.com", "default") == "api.example.com"
    assert vhds_fqdn("outbound_http/*", "default") == ""
    assert vhds_fqdn("outbound_http/", "default") == ""


def test_vhds_host_is_read_from_the_right() -> None:
    assert vhds_host("outbound_http/reviews:9080") == "reviews:9080"
    assert vhds_host("a/b/reviews") == "reviews"
