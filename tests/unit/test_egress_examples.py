"""`examples/egress/*.yaml` (Istio's egress tasks, hostnames adapted) go through the
real loader and validation and compile to what their comments say; `meshctl gateway
--egress` names and labels the gateway as those files expect."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh import compiled
from mesh.messages import ResourceDocument
from mesh.resources import Resource, load_yaml, parse_documents
from meshctl.main import build_parser
from meshctl.sidecar_cmds import gateway_workload
from services.config.compile import compile_gateway_config
from services.config.compile_egress import compile_mesh_wide

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "egress"


def load(*names: str) -> list[Resource]:
    docs = [
        ResourceDocument(source=name, index=i, body=body)
        for name in names
        for i, body in enumerate(load_yaml((EXAMPLES / name).read_text(), name))
    ]
    batch = parse_documents(docs, default_namespace="default")
    return list(batch.resources)


def test_every_example_file_is_accepted() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert names == [
        "allow-any.yaml",
        "egress-gateway-https.yaml",
        "egress-gateway-tls-origination.yaml",
        "egress-gateway.yaml",
        "service-entry-tls-origination.yaml",
        "service-entry.yaml",
    ]
    for name in names:
        assert load(name), name


def test_tls_origination_example_originates_tls_on_port_80() -> None:
    config = compile_mesh_wide(load("service-entry-tls-origination.yaml"), "istio-system", 1)
    (service,) = config.services
    assert service.host == "api.example.test"
    assert [(p.number, p.target_port) for p in service.ports] == [(80, 443), (443, 0)]
    assert service.table is not None
    tls = service.table.traffic_policy.for_port(80).tls
    assert tls == compiled.ClientTls(
        mode="SIMPLE", ca_certificates="/etc/meshwork/egress/api-ca.pem"
    )
    assert service.table.traffic_policy.for_port(443).tls is None


def test_allow_any_example_sets_the_mesh_wide_mode() -> None:
    config = compile_mesh_wide(load("allow-any.yaml"), "istio-system", 1)
    assert config.outbound_traffic_policy == "ALLOW_ANY"


def test_egress_gateway_example_routes_mesh_to_gateway_and_gateway_to_host() -> None:
    resources = load("service-entry.yaml", "egress-gateway.yaml")
    _name, namespace, labels = gateway_workload("", None, {}, egress=True)
    gateway = compile_gateway_config(resources, namespace, labels, 1)
    assert gateway.name == "default/istio-egressgateway"
    (vhost,) = gateway.virtual_hosts
    (rule,) = vhost.http
    assert rule.route[0].destination == compiled.Destination(host="api.example.test", port=80)
    config = compile_mesh_wide(resources, "istio-system", 1)
    (service,) = config.services
    assert service.table is not None
    (mesh_rule,) = service.table.http
    assert mesh_rule.route[0].destination == compiled.Destination(
        host="istio-egressgateway.istio-system.svc.cluster.local", subset="api", port=80
    )


def test_egress_gateway_https_example_routes_by_sni_mesh_to_gateway_and_gateway_to_host() -> None:
    """Istio's "Egress gateway for HTTPS traffic": a TLS PASSTHROUGH server on 443 at
    the gateway, `tls` rules by SNI from the mesh to the gateway's subset and from the
    gateway to the host's port 443."""
    resources = load("egress-gateway-https.yaml")
    _name, namespace, labels = gateway_workload("", None, {}, egress=True)
    gateway = compile_gateway_config(resources, namespace, labels, 1)
    assert gateway.servers == (
        compiled.GatewayServer(port=443, protocol="TLS", hosts=("api.example.test",)),
    )
    (at_gateway,) = gateway.tls
    (match,) = at_gateway.match
    assert (match.port, match.sni_hosts, match.gateways) == (
        443,
        ("api.example.test",),
        ("default/istio-egressgateway",),
    )
    assert at_gateway.route[0].destination == compiled.Destination(
        host="api.example.test", port=443
    )
    config = compile_mesh_wide(resources, "istio-system", 1)
    (service,) = config.services
    assert [(p.number, p.protocol) for p in service.ports] == [(443, "TLS")]
    assert service.table is not None
    (in_mesh,) = service.table.tls
    (match,) = in_mesh.match
    assert (match.port, match.sni_hosts, match.gateways) == (443, ("api.example.test",), ("mesh",))
    assert in_mesh.route[0].destination == compiled.Destination(
        host="istio-egressgateway.istio-system.svc.cluster.local", subset="api", port=443
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["gateway", "--port", "8090", "--egress"],
            (
                "istio-egressgateway",
                "istio-system",
                {"istio": "egressgateway", "app": "istio-egressgateway"},
            ),
        ),
        (
            ["gateway", "--port", "8090", "--egress", "-n", "egress", "--name", "egw"],
            ("egw", "egress", {"istio": "egressgateway", "app": "istio-egressgateway"}),
        ),
        (
            ["gateway", "--port", "8090"],
            (
                "ingressgateway",
                "default",
                {"istio": "ingressgateway", "app": "istio-ingressgateway"},
            ),
        ),
    ],
)
def test_gateway_flags_name_and_label_the_workload(
    argv: list[str], expected: tuple[str, str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MESH_NAMESPACE", raising=False)
    args = build_parser().parse_args(argv)
    assert gateway_workload(args.name, args.namespace, args.labels, egress=args.egress) == expected
