"""Small things Istio users trip over with their own YAML and dashboards (issue 18):
Istio's gateway labels, Gateway port names, `loadBalancer.simple: PASSTHROUGH`, a
Gateway API `Gateway` named for what it is, `istio_build`, the cluster labels, the
caller of a TCP connection named by the destination."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import __version__
from mesh import telemetry as wire
from mesh.hosts import ServiceRef
from mesh.messages import Endpoint
from mesh.resources import Resource, ResourceError, parse_resource
from meshctl.sidecar_cmds import gateway_labels
from proxy.settings import SidecarSettings
from proxy.stats import ProxyStats
from proxy.telemetry import (
    SidecarTelemetry,
    TcpRecord,
    TelemetryRecorder,
    Workload,
    caller_workload,
)
from services.config.compile import compile_gateway_config


def rejection(body: dict[str, Any]) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        parse_resource(body, source="t.yaml", index=0)
    return info.value


def istio_gateway(selector: dict[str, str], port: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Gateway",
        "metadata": {"name": "gw"},
        "spec": {"selector": selector, "servers": [{"port": port, "hosts": ["*"]}]},
    }


@pytest.mark.parametrize("selector", [{"istio": "ingressgateway"}, {"app": "istio-ingressgateway"}])
def test_selectors_of_istios_docs_select_the_ingress_gateway(selector: dict[str, str]) -> None:
    settings = SidecarSettings(
        service="ingressgateway", gateway=True, labels=gateway_labels("ingressgateway", {})
    )
    assert settings.labels["istio"] == "ingressgateway"
    assert settings.labels["app"] == "istio-ingressgateway"
    gw: Resource = parse_resource(
        istio_gateway(selector, {"number": 80, "name": "http", "protocol": "HTTP"}),
        source="-",
        index=0,
    )
    config = compile_gateway_config([gw], "default", settings.labels, 1)
    assert config.name == "default/gw"


def test_gateway_labels_given_on_the_command_line_win() -> None:
    assert gateway_labels("istio-egressgateway", {"app": "mine"}) == {
        "istio": "egressgateway",
        "app": "mine",
    }


def test_a_gateway_port_without_name_is_refused_as_istio_does() -> None:
    error = rejection(
        istio_gateway({"istio": "ingressgateway"}, {"number": 80, "protocol": "HTTP"})
    )
    assert error.path == "spec.servers[0].port.name"
    assert "must be set" in error.message


def test_passthrough_load_balancing_is_not_supported_rather_than_invalid() -> None:
    error = rejection(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "r"},
            "spec": {
                "host": "reviews",
                "trafficPolicy": {"loadBalancer": {"simple": "PASSTHROUGH"}},
            },
        }
    )
    assert error.path == "spec.trafficPolicy.loadBalancer.simple"
    assert "PASSTHROUGH is not supported" in error.message
    assert "must be one of" not in error.message


def test_a_gateway_api_gateway_is_named_for_what_it_is() -> None:
    """Istio's Gateway under the Gateway API's group is the Gateway API's resource
    (docs/architecture.md §8); an unsupported version of it is refused as a version of
    that kind, not with advice to switch to Istio's."""
    error = rejection(
        {
            "apiVersion": "gateway.networking.k8s.io/v1alpha2",
            "kind": "Gateway",
            "metadata": {"name": "bookinfo-gateway"},
            "spec": {
                "gatewayClassName": "istio",
                "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
            },
        }
    )
    assert error.path == "apiVersion"
    assert "gateway.networking.k8s.io/v1alpha2" in error.message
    assert "gateway.networking.k8s.io/v1" in error.message
    assert "Istio's" not in error.message and "use networking.istio.io" not in error.message


# ---------------------------------------------------------------- telemetry


def tcp_labels(recorder: TelemetryRecorder, record: TcpRecord) -> dict[str, str]:
    recorder.record_tcp_opened(record)
    (key,) = [k for k in recorder.totals().counters if k[0] == wire.TCP_OPENED]
    return dict(key[1])


CLIENT = Workload(
    name="sleep-v1", namespace="default", principal="spiffe://x", app="sleep", version="v1"
)


def test_cluster_labels_name_the_configured_cluster_and_unknown_for_unknown_workloads() -> None:
    recorder = TelemetryRecorder(
        reporter_id="r-0_0000abcd", namespace="default", service="r", instance="r-0", cluster="east"
    )
    known = tcp_labels(recorder, TcpRecord("source", CLIENT, CLIENT, "r.default.svc.cluster.local"))
    assert known["source_cluster"] == known["destination_cluster"] == "east"
    # no upstream accepted the connection: no destination workload, no cluster
    nowhere = TcpRecord("source", CLIENT, Workload(), "r.default.svc.cluster.local", flags="UF")
    recorder2 = TelemetryRecorder(
        reporter_id="r-0_0000abcd", namespace="default", service="r", instance="r-0"
    )
    labels = tcp_labels(recorder2, nowhere)
    assert labels["source_cluster"] == "Kubernetes"  # Istio's default CLUSTER_ID
    assert labels["destination_cluster"] == "unknown"


def test_istio_build_gauge_on_every_proxy() -> None:
    stats = ProxyStats()
    value = stats.registry.get_sample_value(
        "istio_build", {"component": "proxy", "tag": __version__}
    )
    assert value == 1


SLEEP = ServiceRef("default", "sleep")
ID = "spiffe://cluster.local/ns/default/sa/sleep"


def ep(instance: str, address: str, version: str, identity: str = ID) -> Endpoint:
    return Endpoint(
        instance=instance,
        address=address,
        version=version,
        identity=identity,
        labels={"app": "sleep"},
    )


@pytest.mark.parametrize(
    ("endpoints", "peer_ip", "expected"),
    [
        ([ep("a", "10.0.0.1:15006", "v1")], "10.0.0.9", ("sleep-v1", "sleep", "v1")),
        # two versions under one identity: the caller's address tells them apart
        (
            [ep("a", "10.0.0.1:15006", "v1"), ep("b", "10.0.0.2:15006", "v2")],
            "10.0.0.2",
            ("sleep-v2", "sleep", "v2"),
        ),
        # ...unless they share a host: what they disagree on stays unknown
        (
            [ep("a", "127.0.0.1:1", "v1"), ep("b", "127.0.0.1:2", "v2")],
            "127.0.0.1",
            ("unknown", "sleep", "unknown"),
        ),
        (
            [ep("a", "[::1]:1", "v1"), ep("b", "10.0.0.2:1", "v2")],
            "::1",
            ("sleep-v1", "sleep", "v1"),
        ),
    ],
)
def test_caller_workload_from_the_registry(
    endpoints: list[Endpoint], peer_ip: str, expected: tuple[str, str, str]
) -> None:
    found = caller_workload(SLEEP, endpoints, ID, peer_ip)
    assert found is not None
    assert (found.name, found.app, found.version) == expected
    assert found.principal == ID and found.namespace == "default"


def test_no_instance_with_the_identity_is_no_caller() -> None:
    other = ep("a", "10.0.0.1:1", "v1", identity="spiffe://cluster.local/ns/default/sa/x")
    assert caller_workload(SLEEP, [other], ID, "10.0.0.1") is None


def test_a_gateway_connection_no_rule_took_has_no_destination() -> None:
    recorder = TelemetryRecorder(
        reporter_id="g-0_0000abcd", namespace="default", service="g", instance="g-0"
    )
    telemetry = SidecarTelemetry(recorder, workload=CLIENT, service_host="g.default")
    labels = tcp_labels(recorder, telemetry.tcp_outbound(None, None, "NR"))
    assert labels["destination_service"] == "unknown"
    assert labels["destination_workload"] == "unknown"
    assert labels["destination_cluster"] == "unknown"
    assert labels["response_flags"] == "NR"
