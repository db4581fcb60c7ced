"""ServiceEntry, DestinationRule `tls`/`portLevelSettings` and MeshConfig
`outboundTrafficPolicy`: validation (field paths), compilation (Istio's merge rules,
the mesh-wide table) and the sidecar's pure egress decisions (endpoints by resolution,
ports, weights, exportTo, TLS origination)."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import compiled
from mesh.compiled_mesh import ExternalService
from mesh.resources import Resource, ResourceError, parse_resource
from proxy.egress import MeshWideFollower, external_destination, find_service
from proxy.upstream_tls import origination_for
from services.config.compile import compile_host_table
from services.config.compile_egress import compile_mesh_wide


def body(
    kind: str, spec: dict[str, Any], namespace: str = "default", name: str = "x"
) -> dict[str, Any]:
    group = "meshwork.io/v1" if kind == "MeshConfig" else "networking.istio.io/v1"
    return {
        "apiVersion": group,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def parse(kind: str, spec: dict[str, Any], namespace: str = "default", name: str = "x") -> Resource:
    return parse_resource(body(kind, spec, namespace, name), source="t.yaml", index=0)


def refused(kind: str, spec: dict[str, Any]) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        parse(kind, spec)
    return info.value


SE = {
    "hosts": ["api.example.test"],
    "ports": [{"number": 80, "name": "http", "protocol": "HTTP", "targetPort": 8443}],
    "resolution": "STATIC",
    "endpoints": [{"address": "10.0.0.1", "labels": {"version": "v1"}}],
}


# ---------------------------------------------------------------- validation


def test_istio_task_service_entry_is_accepted() -> None:
    resource = parse(
        "ServiceEntry",
        {
            "hosts": ["edition.cnn.com"],
            "ports": [
                {"number": 80, "name": "http-port", "protocol": "HTTP", "targetPort": 443},
                {"number": 443, "name": "https-port", "protocol": "HTTPS"},
            ],
            "resolution": "DNS",
        },
    )
    assert resource.kind == "ServiceEntry"


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        ({"hosts": []}, "spec.hosts", "spec.hosts is required"),
        ({"location": "OUTSIDE"}, "spec.location", "must be one of MESH_EXTERNAL, MESH_INTERNAL"),
        ({"resolution": "DNS_MAGIC"}, "spec.resolution", "must be one of NONE, STATIC"),
        ({"endpoints": []}, "spec.endpoints", "resolution STATIC needs endpoints"),
        (
            {"endpoints": [{"address": "api.example.test"}]},
            "spec.endpoints[0].address",
            "resolution STATIC needs an IP address",
        ),
        (
            {"endpoints": [{"address": "10.0.0.1", "ports": {"grpc": 90}}]},
            "spec.endpoints[0].ports.grpc",
            "names no port of spec.ports",
        ),
        ({"hosts": ["*.example.test"]}, "spec.hosts[0]", "a wildcard host needs resolution NONE"),
        ({"ports": [{"number": 80, "protocol": "HTTP"}]}, "spec.ports[0].name", "is required"),
        ({"ports": [{"number": 0, "name": "h"}]}, "spec.ports[0].number", ""),
        ({"addresses": ["not-an-ip"]}, "spec.addresses[0]", "must be an IP or CIDR"),
        ({"exportTo": ["Bad_NS"]}, "spec.exportTo[0]", ""),
    ],
)
def test_service_entry_problems_name_their_field(
    change: dict[str, Any], path: str, message: str
) -> None:
    error = refused("ServiceEntry", {**SE, **change})
    assert error.path == path, str(error)
    assert message in error.message


def test_service_entry_unsupported_fields_are_refused_with_their_path() -> None:
    error = refused("ServiceEntry", {**SE, "subjectAltNames": ["a"]})
    assert error.path == "spec.subjectAltNames"
    assert "is not supported" in error.message


@pytest.mark.parametrize(
    ("tls", "path", "message"),
    [
        ({}, "spec.trafficPolicy.tls.mode", "is required"),
        ({"mode": "STRICT"}, "spec.trafficPolicy.tls.mode", "must be one of DISABLE, SIMPLE"),
        (
            {"mode": "SIMPLE", "credentialName": "api-secret"},
            "spec.trafficPolicy.tls.credentialName",
            "no Kubernetes secrets",
        ),
        (
            {"mode": "MUTUAL"},
            "spec.trafficPolicy.tls.clientCertificate",
            "is required with mode MUTUAL",
        ),
        (
            {"mode": "SIMPLE", "caCertificates": "ca.pem"},
            "spec.trafficPolicy.tls.caCertificates",
            "must be an absolute file path",
        ),
        (
            {"mode": "ISTIO_MUTUAL", "caCertificates": "/ca.pem"},
            "spec.trafficPolicy.tls.caCertificates",
            "must not be set with mode ISTIO_MUTUAL",
        ),
        (
            {"mode": "SIMPLE", "insecureSkipVerify": True, "caCertificates": "/ca.pem"},
            "spec.trafficPolicy.tls.insecureSkipVerify",
            "must not be true together",
        ),
    ],
)
def test_destination_rule_tls_problems(tls: dict[str, Any], path: str, message: str) -> None:
    error = refused("DestinationRule", {"host": "api.example.test", "trafficPolicy": {"tls": tls}})
    assert error.path == path, str(error)
    assert message in error.message


def test_port_level_settings_need_a_port_each_once() -> None:
    error = refused(
        "DestinationRule",
        {
            "host": "a.example.test",
            "trafficPolicy": {
                "portLevelSettings": [
                    {"port": {"number": 80}, "tls": {"mode": "SIMPLE"}},
                    {"port": {"number": 80}, "loadBalancer": {"simple": "RANDOM"}},
                ]
            },
        },
    )
    assert error.path == "spec.trafficPolicy.portLevelSettings[1].port.number"
    assert "duplicate port 80" in error.message
    error = refused(
        "DestinationRule",
        {"host": "a", "trafficPolicy": {"portLevelSettings": [{"tls": {"mode": "SIMPLE"}}]}},
    )
    assert error.path == "spec.trafficPolicy.portLevelSettings[0].port"


def test_outbound_traffic_policy_mode_is_checked() -> None:
    error = refused("MeshConfig", {"outboundTrafficPolicy": {"mode": "ALLOW_SOME"}})
    assert error.path == "spec.outboundTrafficPolicy.mode"
    assert "must be one of REGISTRY_ONLY, ALLOW_ANY" in error.message


# ---------------------------------------------------------------- compilation


def test_port_level_settings_override_per_field_and_subsets_inherit_them() -> None:
    rule = parse(
        "DestinationRule",
        {
            "host": "api.example.test",
            "trafficPolicy": {
                "loadBalancer": {"simple": "RANDOM"},
                "tls": {"mode": "DISABLE"},
                "portLevelSettings": [
                    {"port": {"number": 80}, "tls": {"mode": "SIMPLE", "sni": "API.example.test"}}
                ],
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {
                        "portLevelSettings": [
                            {"port": {"number": 443}, "loadBalancer": {"simple": "LEAST_REQUEST"}}
                        ]
                    },
                },
            ],
        },
    )
    table = compile_host_table([rule], "api.example.test", "default", "api.example.test", 7)
    top = table.traffic_policy
    assert top.tls == compiled.ClientTls(mode="DISABLE")
    port80 = top.for_port(80)
    # the port's tls replaces the destination's; its other fields are inherited
    assert port80.tls == compiled.ClientTls(mode="SIMPLE", sni="api.example.test")
    assert port80.load_balancer.simple == "RANDOM"
    assert top.for_port(8080) is top
    v1, v2 = table.subsets
    # a subset without portLevelSettings of its own keeps the destination's
    assert v1.traffic_policy.for_port(80).tls == port80.tls
    # a subset with its own replaces the list (Istio's MergeTrafficPolicy)
    assert [p.port for p in v2.traffic_policy.port_level] == [443]
    assert v2.traffic_policy.for_port(443).load_balancer.simple == "LEAST_REQUEST"
    assert v2.traffic_policy.for_port(80).tls == compiled.ClientTls(mode="DISABLE")


def test_mesh_wide_table_holds_service_entries_and_the_root_outbound_policy() -> None:
    entry = parse("ServiceEntry", {**SE, "exportTo": ["."]}, namespace="shop", name="api")
    other_ns_policy = parse(
        "MeshConfig", {"outboundTrafficPolicy": {"mode": "ALLOW_ANY"}}, namespace="shop"
    )
    rule = parse(
        "DestinationRule",
        {"host": "api.example.test", "trafficPolicy": {"tls": {"mode": "SIMPLE"}}},
        namespace="shop",
    )
    config = compile_mesh_wide([entry, other_ns_policy, rule], "istio-system", 3)
    # only the root namespace's MeshConfig counts
    assert config.outbound_traffic_policy == "REGISTRY_ONLY"
    (service,) = config.services
    assert (service.host, service.namespace, service.name) == ("api.example.test", "shop", "api")
    assert service.export_to == ("shop",)
    assert service.resolution == "STATIC"
    assert service.table is not None
    assert service.table.traffic_policy.tls == compiled.ClientTls(mode="SIMPLE")
    root = parse(
        "MeshConfig", {"outboundTrafficPolicy": {"mode": "ALLOW_ANY"}}, namespace="istio-system"
    )
    assert compile_mesh_wide([root], "istio-system", 4).outbound_traffic_policy == "ALLOW_ANY"


# ---------------------------------------------------------------- sidecar decisions


def service(**fields: Any) -> ExternalService:
    defaults: dict[str, Any] = {
        "host": "api.example.test",
        "namespace": "default",
        "name": "api",
        "table": compiled.RouteTable(
            namespace="default", service="api.example.test", host="api.example.test", revision=1
        ),
    }
    return ExternalService(**{**defaults, **fields})


def addresses(svc: ExternalService, host: str = "api.example.test", port: int = 80) -> list[str]:
    dest = external_destination(svc, host, port, 1)
    assert dest is not None and dest.endpoints is not None
    return [e.address for e in dest.endpoints.endpoints]


def test_endpoints_by_resolution_and_port() -> None:
    from mesh.compiled_mesh import EntryEndpoint, EntryPort

    ports = (EntryPort(number=80, name="http", target_port=8443),)
    static = service(
        resolution="STATIC",
        ports=ports,
        endpoints=(
            EntryEndpoint(address="10.0.0.1"),
            EntryEndpoint(address="10.0.0.2", ports={"http": 9443}),
            EntryEndpoint(address="::1"),
        ),
    )
    assert addresses(static) == ["10.0.0.1:8443", "10.0.0.2:9443", "[::1]:8443"]
    # an undeclared port is not this host
    assert external_destination(static, "api.example.test", 81, 1) is None
    # DNS without endpoints: the host itself, resolved when connecting
    assert addresses(service(resolution="DNS", ports=ports)) == ["api.example.test:8443"]
    # NONE: where the request was going (the wildcard's concrete host)
    wildcard = service(host="*.example.test", resolution="NONE")
    assert addresses(wildcard, "b.example.test", 8080) == ["b.example.test:8080"]


def test_endpoint_weights_keep_their_ratio() -> None:
    from mesh.compiled_mesh import EntryEndpoint

    svc = service(
        resolution="STATIC",
        endpoints=(
            EntryEndpoint(address="10.0.0.1", weight=30),
            EntryEndpoint(address="10.0.0.2", weight=10),
            EntryEndpoint(address="10.0.0.3", weight=0),
        ),
    )
    got = addresses(svc)
    assert got.count("10.0.0.1:80") == 3 * got.count("10.0.0.2:80")
    assert "10.0.0.3:80" not in got


def test_find_service_prefers_exact_hosts_and_respects_export_to() -> None:
    from mesh.compiled_mesh import MeshWideConfig

    config = MeshWideConfig(
        revision=1,
        services=(
            service(host="*.example.test"),
            service(host="*.api.example.test"),
            service(host="api.example.test", export_to=("shop",)),
        ),
    )
    found = find_service(config, "api.example.test", "shop")
    assert found is not None and found.host == "api.example.test"
    # not exported to `default`: the widest wildcard that covers it instead
    found = find_service(config, "api.example.test", "default")
    assert found is not None and found.host == "*.example.test"
    found = find_service(config, "v1.api.example.test", "default")
    assert found is not None and found.host == "*.api.example.test"
    assert find_service(config, "example.org", "default") is None


def test_origination_applies_to_every_mode_but_istio_mutual() -> None:
    assert origination_for(None, "h") is None
    assert origination_for(compiled.ClientTls(mode="ISTIO_MUTUAL"), "h") is None
    simple = origination_for(compiled.ClientTls(mode="SIMPLE"), "api.example.test")
    assert simple is not None and simple.server_name == "api.example.test"
    named = origination_for(compiled.ClientTls(mode="SIMPLE", sni="x.test"), "api.example.test")
    assert named is not None and named.server_name == "x.test"
    disabled = origination_for(compiled.ClientTls(mode="DISABLE"), "h")
    assert disabled is not None and disabled.plaintext


def test_a_mesh_wide_table_with_an_invalid_route_is_rejected_and_the_last_kept() -> None:
    from mesh.compiled_mesh import MeshWideConfig

    class Subjects:
        config_mesh_wide = "p.config.meshwide"

    class FakeBus:
        subjects = Subjects()

    changes: list[int] = []
    follower = MeshWideFollower(FakeBus(), lambda: changes.append(1))  # type: ignore[arg-type]
    good = MeshWideConfig(revision=2, services=(service(),))
    assert follower.apply(good)
    bad_table = compiled.RouteTable(
        namespace="default",
        service="api.example.test",
        host="api.example.test",
        revision=3,
        http=(
            compiled.HTTPRoute(
                match=(compiled.HTTPMatch(uri=compiled.StringMatch(kind="regex", value="(")),),
                route=(compiled.WeightedDestination(compiled.Destination(host="a")),),
            ),
        ),
    )
    assert not follower.apply(MeshWideConfig(revision=3, services=(service(table=bad_table),)))
    assert follower.config is good
    assert follower.status is not None and follower.status.state == "NACK"
    assert follower.destination("api.example.test", 80, "default") is not None


def test_push_scope_marks_the_mesh_wide_table_only_for_changes_that_can_touch_it() -> None:
    from services.config.push import scope_of_change

    entry = parse("ServiceEntry", SE)
    assert scope_of_change(None, entry, "istio-system").mesh_wide
    external_vs = parse(
        "VirtualService",
        {
            "hosts": ["api.example.test"],
            "http": [{"route": [{"destination": {"host": "api.example.test"}}]}],
        },
    )
    assert scope_of_change(None, external_vs, "istio-system").mesh_wide
    mesh_vs = parse(
        "VirtualService",
        {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews"}}]}]},
    )
    assert not scope_of_change(None, mesh_vs, "istio-system").mesh_wide
    external_dr = parse("DestinationRule", {"host": "api.example.test"})
    assert scope_of_change(external_dr, None, "istio-system").mesh_wide


def test_workload_selector_picks_instances_of_the_entry_namespace_by_label() -> None:
    from mesh.messages import Endpoint, EndpointSet

    entry = parse(
        "ServiceEntry",
        {
            "hosts": ["billing.internal.test"],
            "location": "MESH_INTERNAL",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "resolution": "STATIC",
            "workloadSelector": {"labels": {"tier": "billing"}},
        },
        namespace="shop",
    )
    (svc,) = compile_mesh_wide([entry], "istio-system", 1).services
    assert svc.workload_selector == {"tier": "billing"}

    def instance(name: str, tier: str) -> Endpoint:
        return Endpoint(
            instance=name, address=f"10.0.0.{len(name)}:15006", labels={"tier": tier}, identity="id"
        )

    sets = [
        EndpointSet(
            namespace="shop",
            service="billing",
            revision=1,
            endpoints=[instance("a", "billing"), instance("bb", "web")],
        ),
        EndpointSet(
            namespace="other", service="billing", revision=1, endpoints=[instance("ccc", "billing")]
        ),
    ]
    dest = external_destination(svc, svc.host, 80, 1, sets)
    assert dest is not None and dest.endpoints is not None
    # the sidecar's own address and identity: reached over the mesh's mTLS
    assert [(e.instance, e.identity) for e in dest.endpoints.endpoints] == [("a", "id")]


def test_workload_selector_needs_mesh_internal_and_labels() -> None:
    error = refused(
        "ServiceEntry",
        {
            "hosts": ["billing.internal.test"],
            "location": "MESH_EXTERNAL",
            "ports": [{"number": 80, "name": "http"}],
            "workloadSelector": {"labels": {"tier": "billing"}},
        },
    )
    assert (error.path, error.message) == ("spec.workloadSelector", "needs location MESH_INTERNAL")
