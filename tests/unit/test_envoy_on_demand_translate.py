"""On-demand translation (`ProxyNode.on_demand`) and the VHDS answer the agent builds:
the outbound route configuration names VHDS and no virtual host, each destination's
virtual host is served by name, and requested hosts map to them as aliases."""

from __future__ import annotations

import dataclasses

from envoy.config.route.v3 import route_components_pb2

from mesh.compiled import RouteTable
from mesh.compiled_mesh import EntryPort, ExternalService, MeshWideConfig
from proxy.dataplane.envoy_view import vhds_answer, vhds_fqdn, vhds_host
from proxy.envoy.resources import XdsResources
from proxy.envoy.translate import MeshView, translate
from proxy.envoy.translate.protos import to_dict
from tests.unit.test_envoy_translate_golden import (
    RATINGS,
    REVIEWS,
    case_outbound_egress,
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
    resources, absent = vhds_answer(out.virtual_hosts, requested, out.unknown_host)
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


def served(resources: list, name: str) -> dict:  # type: ignore[type-arg]
    found = next(r for r in resources if r.name == name)
    return to_dict(route_components_pb2.VirtualHost.FromString(found.value))


def test_an_unknown_host_is_refused_under_registry_only_on_demand() -> None:
    out = translate(sidecar(on_demand=True), VIEW)
    assert out.unknown_host is not None
    name = "outbound_http/localhost:8080"
    fqdn = vhds_fqdn(name, "default")
    resources, absent = vhds_answer(out.virtual_hosts, {name: fqdn}, out.unknown_host)
    vhost = served(resources, f"outbound_http/{fqdn}")
    assert vhost["domains"] == ["localhost"]
    assert [r["directResponse"]["status"] for r in vhost["routes"]] == [502]
    assert "PassthroughCluster" not in out.clusters and not absent


def test_allow_any_passes_unknown_hosts_through_on_demand() -> None:
    """The Host nobody knows gets the catch-all's ALLOW_ANY routes under its own name
    (CONNECT tunnelled, plain requests to `PassthroughCluster`), with the dynamic
    forward proxy before the router, as when everything is pushed."""
    node, egress_view = case_outbound_egress()
    node = dataclasses.replace(node, on_demand=True)
    out = translate(node, egress_view)
    everything = translate(dataclasses.replace(node, on_demand=False), egress_view)
    catch_all = to_dict(everything.routes["outbound_http"])["virtualHosts"][-1]
    name = "outbound_http/unknown.example.test:8080"
    resources, _ = vhds_answer(out.virtual_hosts, {name: "unknown.example.test"}, out.unknown_host)
    vhost = served(resources, "outbound_http/unknown.example.test")
    assert vhost["domains"] == ["unknown.example.test"]
    assert vhost["routes"] == catch_all["routes"]
    # ahead of the passthrough, the Hosts naming the sidecar's own listeners get 508
    own = [r for r in vhost["routes"] if r["name"].startswith("own_listener")]
    assert own and all(r["directResponse"]["status"] == 508 for r in own)
    passed = [r for r in vhost["routes"] if r not in own]
    assert [r["route"]["cluster"] for r in passed] == ["PassthroughCluster"] * 2
    assert "envoy.filters.http.dynamic_forward_proxy" in outbound_filters(out)
    assert "PassthroughCluster" in out.clusters


def test_service_entry_hosts_are_served_on_demand_as_when_pushed() -> None:
    """A ServiceEntry host's virtual host is the one the route configuration holds
    otherwise, served under the asked name as alias; a host exported elsewhere is the
    unknown host."""
    node, egress_view = case_outbound_egress()
    out = translate(dataclasses.replace(node, on_demand=True), egress_view)
    everything = translate(node, egress_view)
    pushed = {v["name"]: v for v in to_dict(everything.routes["outbound_http"])["virtualHosts"]}
    requested = {
        "outbound_http/api.example.test": "api.example.test",
        "outbound_http/legacy.example.test:8080": "legacy.example.test",
        "outbound_http/hidden.example.test": "hidden.example.test",
    }
    resources, _ = vhds_answer(out.virtual_hosts, requested, out.unknown_host)
    for host in ("api.example.test", "legacy.example.test"):
        vhost = served(resources, f"outbound_http/{host}")
        assert vhost == {**pushed[host], "name": f"outbound_http/{host}"}
    legacy = next(r for r in resources if r.name == "outbound_http/legacy.example.test")
    assert legacy.aliases == {"outbound_http/legacy.example.test:8080"}
    hidden = served(resources, "outbound_http/hidden.example.test")
    assert hidden["routes"] == pushed["unknown_host"]["routes"]
    # the same clusters, pushed with the first configuration (the hosts are known)
    external = {c for c in everything.clusters if "example.test" in c}
    assert "outbound|0|v2|legacy.example.test" in external
    assert {c for c in out.clusters if "example.test" in c} == external


def test_a_service_entry_host_in_the_mesh_domain_answers_to_its_short_names() -> None:
    """`billing.internal` is `billing.internal.svc.cluster.local` to the Python
    sidecar (`canonical_host`): Envoy's virtual host lists the names that resolve to it,
    on demand and not."""
    host = "billing.internal.svc.cluster.local"
    table = RouteTable(namespace="default", service=host, host=host, revision=1)
    entry = ExternalService(
        host=host,
        namespace="default",
        name="billing",
        ports=(EntryPort(number=80, name="http"),),
        table=table,
    )
    view = dataclasses.replace(VIEW, mesh_wide=MeshWideConfig(revision=1, services=(entry,)))
    everything = translate(sidecar(), view)
    pushed = {v["name"]: v for v in to_dict(everything.routes["outbound_http"])["virtualHosts"]}
    assert "billing.internal" in pushed[host]["domains"]
    out = translate(sidecar(on_demand=True), view)
    name = "outbound_http/billing.internal"
    resources, _ = vhds_answer(out.virtual_hosts, {name: vhds_fqdn(name, "default")}, None)
    assert "billing.internal" in served(resources, f"outbound_http/{host}")["domains"]
