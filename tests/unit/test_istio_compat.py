"""Small things Istio users trip over with their own YAML (issue 18): Istio's gateway
labels, Gateway port names, `loadBalancer.simple: PASSTHROUGH`, a Gateway API
`Gateway` named for what it is."""

from __future__ import annotations

from typing import Any

import pytest

from mesh.cli.sidecar_cmds import gateway_labels
from mesh.resources import Resource, ResourceError, parse_resource
from proxy.settings import SidecarSettings
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
    error = rejection(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "bookinfo-gateway"},
            "spec": {
                "gatewayClassName": "istio",
                "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
            },
        }
    )
    assert error.path == "apiVersion"
    assert "Kubernetes Gateway API (gateway.networking.k8s.io/v1) is not supported" in error.message
    # not the old advice to change the version of what is another resource
    assert "use networking.istio.io" not in error.message
