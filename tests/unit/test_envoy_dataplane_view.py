"""The Envoy data plane's pure parts: the translator's inputs from the agent's state,
and the proxy-status entries once Envoy answered a push."""

from __future__ import annotations

from mesh.compiled_mesh import ExternalService, MeshWideConfig
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint, EndpointSet, SubscriptionStatus
from proxy.dataplane.envoy_view import (
    ApplyTracker,
    EnvoyPorts,
    capture_detection_timeouts,
    destinations_of_clusters,
    mesh_view,
    port_flag,
    ports_in_use,
    proxy_node,
    selected_by,
    selecting_entries,
    view_endpoints,
)
from proxy.destinations import Destination
from proxy.intercept.rules import InterceptSettings
from proxy.settings import SidecarSettings

ROUTE = "mesh.config.route.default.reviews"
EPS = "mesh.registry.endpoints.default.reviews"
INBOUND = "mesh.config.inbound.default.productpage"


def followed(**revisions: int) -> list[SubscriptionStatus]:
    names = {"route": ROUTE, "eps": EPS, "inbound": INBOUND}
    return [SubscriptionStatus(subject=names[k], revision=v) for k, v in revisions.items()]


def by_subject(entries: list[SubscriptionStatus]) -> dict[str, SubscriptionStatus]:
    return {e.subject: e for e in entries}


def test_nothing_counts_as_applied_before_envoy_acks() -> None:
    tracker = ApplyTracker().translated({ROUTE: 3, EPS: 5})
    out = by_subject(tracker.statuses(followed(route=3, eps=5)))
    assert out[ROUTE].revision == 0 and out[ROUTE].state == "ACK"
    assert out[EPS].revision == 0


def test_an_ack_applies_the_revisions_the_push_was_made_from() -> None:
    tracker = ApplyTracker().translated({ROUTE: 3, EPS: 5}).acked()
    # the followers moved on meanwhile (route 4): Envoy runs 3 until the next ACK
    out = by_subject(tracker.statuses(followed(route=4, eps=5)))
    assert (out[ROUTE].revision, out[EPS].revision) == (3, 5)
    assert all(e.state == "ACK" for e in out.values())


def test_a_nack_shows_the_reason_on_the_subjects_it_changed_and_keeps_the_last_good() -> None:
    good = ApplyTracker().translated({ROUTE: 3, EPS: 5}).acked()
    bad = good.translated({ROUTE: 4, EPS: 5}).rejected({ROUTE: 4, EPS: 5}, "LDS: bad filter")
    out = by_subject(bad.statuses(followed(route=4, eps=5)))
    assert out[ROUTE].state == "NACK" and out[ROUTE].reason == "LDS: bad filter"
    assert (out[ROUTE].revision, out[ROUTE].rejected_revision) == (3, 4)
    assert out[EPS].state == "ACK" and out[EPS].revision == 5
    # the next push that Envoy takes clears the rejection
    fixed = bad.translated({ROUTE: 6, EPS: 5}).acked()
    out = by_subject(fixed.statuses(followed(route=6, eps=5)))
    assert out[ROUTE].state == "ACK" and out[ROUTE].revision == 6


def test_an_entry_the_agent_rejected_itself_is_reported_as_it_is() -> None:
    agent_nack = SubscriptionStatus(
        subject=ROUTE, revision=2, state="NACK", reason="bad signature", rejected_revision=3
    )
    tracker = ApplyTracker().translated({ROUTE: 2}).acked()
    assert tracker.statuses([agent_nack]) == [agent_nack]


def test_proxy_node_of_a_sidecar_and_of_a_gateway() -> None:
    s = SidecarSettings(
        service="productpage",
        version="v1",
        app_port=9080,
        bind_host="127.0.0.2",
        tcp_ports=[6379],
        tcp_upstreams=["redis:6379=16379"],
        instance="pp-0",
    )
    node = proxy_node(s, EnvoyPorts(admin=1, inbound=2, outbound=3, tcp_inbound={6379: 4}))
    assert node.role == "sidecar" and node.app_port == 9080
    assert node.inbound == ("127.0.0.2", 2) and node.outbound == ("127.0.0.1", 3)
    assert node.identity == "spiffe://cluster.local/ns/default/sa/productpage"
    assert node.tcp_inbound == ((6379, ("127.0.0.2", 4)),)
    assert [u.local_port for u in node.tcp_upstreams] == [16379]
    assert node.labels == {"app": "productpage", "version": "v1"}

    gw = SidecarSettings(service="ingressgateway", gateway=True, gateway_port=8080, instance="g")
    node = proxy_node(gw, EnvoyPorts(admin=1, gateway=8080))
    assert node.role == "gateway" and node.inbound is None and node.outbound is None
    assert node.gateway_listeners == (("127.0.0.1", 8080),)


def test_mesh_view_keys_destinations_by_fqdn_and_leaves_out_unknown_ones() -> None:
    known = Destination(ServiceRef("default", "reviews"))
    known.endpoints = EndpointSet(namespace="default", service="reviews", revision=7)
    empty = Destination(ServiceRef("default", "nothing"))
    view = mesh_view(
        {known.ref: known, empty.ref: empty},
        inbound=None,
        gateway=None,
    )
    assert list(view.destinations) == ["reviews.default.svc.cluster.local"]
    assert view.destinations["reviews.default.svc.cluster.local"] == (None, known.endpoints)


def test_access_logs_name_endpoints_from_the_view_envoy_was_configured_from() -> None:
    known = Destination(ServiceRef("default", "reviews"))
    known.endpoints = EndpointSet(namespace="default", service="reviews", revision=7)
    view = mesh_view({known.ref: known}, inbound=None, gateway=None)
    assert view_endpoints(view, "reviews.default.svc.cluster.local") is known.endpoints
    assert view_endpoints(view, "ratings.default.svc.cluster.local") is None
    assert view_endpoints(None, "reviews.default.svc.cluster.local") is None  # nothing pushed


def test_ports_envoy_could_not_bind_are_read_from_its_rejection() -> None:
    rejection = (
        "LDS: Error adding/updating listener(s) gateway-http-8080: cannot bind "
        "'127.0.0.1:8080': Address already in use\n, inbound: cannot bind '[::1]:15006': "
        "Address already in use\n, gateway-http-8080: cannot bind '127.0.0.1:8080': "
        "Address already in use"
    )
    assert ports_in_use(rejection) == [("127.0.0.1", 8080), ("::1", 15006)]
    assert ports_in_use("LDS: cannot bind '127.0.0.1:80': Permission denied") == []
    assert ports_in_use("") == []


def test_a_port_envoy_could_not_bind_is_named_by_the_flag_that_chose_it() -> None:
    gateway = EnvoyPorts(admin=15000, gateway=8080)
    assert port_flag(gateway, 8080) == "--port"
    assert port_flag(gateway, 9443) == "port"  # a Gateway server's port
    sidecar = EnvoyPorts(admin=15000, inbound=15006, outbound=15001)
    assert port_flag(sidecar, 15006) == "--inbound-port"
    assert port_flag(sidecar, 15001) == "--outbound-port"
    assert port_flag(sidecar, 0) == "port"


ENVOY_STATS = """# TYPE envoy_listener_downstream_pre_cx_timeout counter
envoy_listener_downstream_pre_cx_timeout{envoy_listener_address="127.0.0.1_16160"} 7
envoy_listener_downstream_pre_cx_timeout{envoy_listener_address="virtual_outbound"} 3
"""


def test_capture_detection_timeouts_come_from_the_capture_listeners_stat() -> None:
    text = capture_detection_timeouts(ENVOY_STATS)
    lines = text.splitlines()
    assert "# TYPE meshwork_proxy_capture_detection_timeouts_total counter" in lines
    # the capture listener's counter only, not another listener's
    assert lines[-1] == "meshwork_proxy_capture_detection_timeouts_total 3"
    # no capture listener (not intercepted): no series
    assert capture_detection_timeouts(ENVOY_STATS.replace("virtual_outbound", "x")) == ""


def test_proxy_node_carries_the_opaque_ports_of_an_intercepted_app() -> None:
    settings = SidecarSettings(
        service="productpage",
        app_port=9080,
        intercept=True,
        capture=InterceptSettings(opaque_ports=(3306, 25)),
    )
    node = proxy_node(settings, EnvoyPorts(admin=1, capture_host="100.127.0.1", capture=15001))
    assert node.capture == ("100.127.0.1", 15001) and node.opaque_ports == (25, 3306)
    # without a capture listener there is nothing to skip detection on
    assert proxy_node(settings, EnvoyPorts(admin=1)).opaque_ports == ()


def test_on_demand_is_a_plain_sidecars_default() -> None:
    """On demand unless turned off; never for a gateway (its routes name its hosts) or
    an intercepting sidecar (captured TCP has no Host to ask by)."""
    ports = EnvoyPorts(admin=1, inbound=2, outbound=3)
    plain = SidecarSettings(service="productpage", app_port=9080)
    assert proxy_node(plain, ports).on_demand is True
    off = SidecarSettings(service="productpage", app_port=9080, envoy_on_demand=False)
    assert proxy_node(off, ports).on_demand is False
    gw = SidecarSettings(service="ingressgateway", gateway=True, gateway_port=8080)
    assert proxy_node(gw, EnvoyPorts(admin=1, gateway=8080)).on_demand is False
    intercepted = SidecarSettings(service="productpage", app_port=9080, intercept=True)
    capture = EnvoyPorts(admin=1, inbound=2, outbound=3, capture_host="100.127.0.1", capture=4)
    assert proxy_node(intercepted, capture).on_demand is False


def test_workload_selector_entries_name_the_services_followed_on_demand() -> None:
    """A ServiceEntry selecting registered instances (exported here) makes the
    services of the instances it selects followed; other entries and services not."""
    billing = ExternalService(
        host="billing.internal.test",
        namespace="default",
        name="billing",
        workload_selector={"tier": "billing"},
    )
    elsewhere = ExternalService(
        host="hidden.internal.test",
        namespace="other",
        name="hidden",
        export_to=("other",),
        workload_selector={"tier": "billing"},
    )
    plain = ExternalService(host="api.example.test", namespace="default", name="api")
    wide = MeshWideConfig(revision=1, services=(billing, elsewhere, plain))
    entries = selecting_entries("default", wide)
    assert entries == (billing,)
    assert selecting_entries("default", None) == ()

    def instances(namespace: str, service: str, **labels: str) -> EndpointSet:
        ep = Endpoint(instance=f"{service}-0", address="127.0.0.1:1", labels=labels)
        return EndpointSet(namespace=namespace, service=service, revision=1, endpoints=[ep])

    assert selected_by(entries, instances("default", "legacy-billing", tier="billing"))
    assert not selected_by(entries, instances("default", "reviews", tier="web"))
    # the entry's namespace only, as the Python sidecar selects
    assert not selected_by(entries, instances("other", "legacy-billing", tier="billing"))


def test_an_adopted_envoys_clusters_name_the_destinations_to_follow_again() -> None:
    names = [
        "outbound|9080||reviews.default.svc.cluster.local",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
        "outbound|9080||ratings.shop.svc.cluster.local",
        "outbound|443||api.example.com",  # a ServiceEntry host: no mesh service
        "inbound|9080||",
        "xds-grpc",
    ]
    assert destinations_of_clusters(names) == {
        ServiceRef("default", "reviews"),
        ServiceRef("shop", "ratings"),
    }
