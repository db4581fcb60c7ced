"""Envoy itself validates every golden translation (`envoy --mode validate`).

Each case's resources go into a static bootstrap: listeners with their route
configuration inlined (what RDS would deliver), clusters made STATIC with their
ClusterLoadAssignment inlined (what EDS would deliver), the SDS secrets as static
secrets made from real certificates, which the TLS contexts then name without their
ADS `sdsConfig` (Envoy 1.40 crashes validating an SDS-over-ADS reference: validation
mode has no ADS stream).
"""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh import identity
from mesh.compiled import (
    AuthzPolicy,
    AuthzRule,
    Destination,
    DirectResponse,
    HeaderOps,
    Headers,
    HTTPMatch,
    HTTPRoute,
    InboundPolicy,
    Operation,
    Rewrite,
    RouteTable,
    StringMatch,
    Subset,
    WeightedDestination,
)
from mesh.messages import Endpoint, EndpointSet
from mesh.servers import free_port
from proxy.envoy.bootstrap import INTERNAL_LISTENERS
from proxy.envoy.translate import MeshView, ProxyNode, tls_secrets, translate
from proxy.envoy.translate.protos import to_dict
from services.ca import issuing
from tests.envoy_support import envoy_binary, http_get, serve_http, static_envoy
from tests.unit.test_envoy_translate_golden import CASES, TD, resources_json


def _pem_secrets() -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC)
    root_key = identity.generate_key()
    root = issuing.create_root(root_key, TD, now, dt.timedelta(days=1))
    key = identity.generate_key()
    cert = issuing.sign_workload(
        key.public_key(),
        identity.spiffe_id(TD, "default", "productpage"),
        issuing.Issuer(cert=root, key=root_key),
        now,
        dt.timedelta(hours=1),
    )
    secrets = tls_secrets(
        identity.cert_pem(cert).decode(),
        identity.private_key_pem(key).decode(),
        identity.cert_pem(root).decode(),
    )
    return [to_dict(s) for s in secrets.values()]


def _make_static(node: Any, routes: dict[str, Any]) -> None:
    """Replace every `rds` of an HCM with the route configuration it names, and make
    SDS references name the static secrets."""
    if isinstance(node, dict):
        rds = node.get("rds")
        if isinstance(rds, dict) and "routeConfigName" in rds:
            del node["rds"]
            node["routeConfig"] = routes[rds["routeConfigName"]]
        if "sdsConfig" in node:
            assert node["sdsConfig"] == {"ads": {}, "resourceApiVersion": "V3"}, node
            del node["sdsConfig"]
        for value in node.values():
            _make_static(value, routes)
    elif isinstance(node, list):
        for value in node:
            _make_static(value, routes)


def bootstrap(case: str) -> dict[str, Any]:
    node, view = CASES[case]()
    return static_bootstrap(node, view, f"validate-{case}")


def static_bootstrap(node: ProxyNode, view: MeshView, node_id: str) -> dict[str, Any]:
    resources = resources_json(translate(node, view))
    listeners = list(resources["listeners"].values())
    _make_static(listeners, resources["routes"])
    clusters = []
    for name, cluster in resources["clusters"].items():
        if cluster.get("type") == "EDS":
            del cluster["edsClusterConfig"]
            cluster["type"] = "STATIC"
            cluster["loadAssignment"] = resources["endpoints"][name]
        _make_static(cluster, {})
        clusters.append(cluster)
    grpc_cluster = {
        "type": "STATIC",
        "connectTimeout": "1s",
        "loadAssignment": {"clusterName": "x", "endpoints": []},
        "typedExtensionProtocolOptions": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicitHttpConfig": {"http2ProtocolOptions": {}},
            }
        },
    }
    for grpc_service in (node.access_log_cluster, node.tracing_cluster):
        if grpc_service:
            clusters.append({**grpc_cluster, "name": grpc_service})
    return {
        "node": {"id": node_id, "cluster": node.service},
        "bootstrapExtensions": [INTERNAL_LISTENERS],
        "staticResources": {
            "listeners": listeners,
            "clusters": clusters,
            "secrets": _pem_secrets(),
        },
    }


def httpbin_inbound_node(inbound_port: int, app_port: int) -> ProxyNode:
    """An inbound-only sidecar of `foo/httpbin` (v1) in front of the app on `app_port`."""
    return ProxyNode(
        namespace="foo",
        service="httpbin",
        version="v1",
        labels={"app": "httpbin"},
        identity=identity.spiffe_id(TD, "foo", "httpbin"),
        trust_domain=TD,
        role="sidecar",
        inbound=("127.0.0.1", inbound_port),
        outbound=None,
        app_port=app_port,
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_validates_translation(case: str, tmp_path: Path) -> None:
    envoy = envoy_binary()
    config = tmp_path / f"{case}.json"
    config.write_text(json.dumps(bootstrap(case), indent=1))
    result = subprocess.run(
        [envoy, "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"envoy rejected {case}:\n{result.stdout}\n{result.stderr}"


# ---------------------------------------------------------------- live traffic


class _App(http.server.BaseHTTPRequestHandler):
    """The app behind the sidecar: answers what it received, as JSON."""

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "path": self.path,
                "host": self.headers.get("host", ""),
                "xfcc": self.headers.get("x-forwarded-client-cert", ""),
                "x-subset": self.headers.get("x-subset", ""),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _live_mesh(app_port: int, inbound_port: int, outbound_port: int) -> tuple[ProxyNode, MeshView]:
    """One sidecar calling `reviews`, whose only endpoint is this sidecar's own
    inbound listener (plaintext: the endpoint registered no identity)."""
    fqdn = "reviews.default.svc.cluster.local"
    v1 = WeightedDestination(destination=Destination(host=fqdn, subset="v1"))
    table = RouteTable(
        namespace="default",
        service="reviews",
        host=fqdn,
        revision=1,
        exists=True,
        has_virtual_service=True,
        subsets=(Subset(name="v1", labels={"version": "v1"}),),
        http=(
            HTTPRoute(
                name="teapot",
                match=(HTTPMatch(uri=StringMatch(kind="exact", value="/teapot")),),
                direct_response=DirectResponse(status=418, body="short and stout"),
            ),
            HTTPRoute(
                name="api",
                match=(
                    HTTPMatch(
                        uri=StringMatch(kind="prefix", value="/api"),
                        without_headers={"x-canary": StringMatch(kind="exact", value="1")},
                        authority=StringMatch(kind="exact", value="reviews"),
                    ),
                ),
                route=(
                    WeightedDestination(
                        destination=Destination(host=fqdn, subset="v1"),
                        headers=Headers(request=HeaderOps(set={"x-subset": "v1"})),
                    ),
                ),
                rewrite=Rewrite(uri="/v2"),
            ),
            HTTPRoute(
                name="tester-only",
                match=(HTTPMatch(source_labels={"app": "tester"}),),
                direct_response=DirectResponse(status=599),
            ),
            HTTPRoute(name="rest", route=(v1,)),
        ),
    )
    endpoints = EndpointSet(
        namespace="default",
        service="reviews",
        revision=1,
        endpoints=[
            Endpoint(instance="reviews-1", address=f"127.0.0.1:{inbound_port}", version="v1")
        ],
    )
    inbound = InboundPolicy(
        namespace="default",
        service="productpage",
        revision=1,
        authorization=(
            AuthzPolicy(
                name="no-admin",
                namespace="default",
                action="DENY",
                rules=(AuthzRule(operations=(Operation(paths=("/admin*",)),)),),
            ),
        ),
    )
    node = ProxyNode(
        namespace="default",
        service="productpage",
        version="v1",
        labels={"app": "productpage"},
        identity=identity.spiffe_id(TD, "default", "productpage"),
        trust_domain=TD,
        role="sidecar",
        inbound=("127.0.0.1", inbound_port),
        outbound=("127.0.0.1", outbound_port),
        app_port=app_port,
    )

    def via_own_inbound(service: str, peer: str) -> EndpointSet:
        # an endpoint that registered an identity is reached over mTLS
        return EndpointSet(
            namespace="default",
            service=service,
            revision=1,
            endpoints=[
                Endpoint(
                    instance=f"{service}-1",
                    address=f"127.0.0.1:{inbound_port}",
                    identity=identity.spiffe_id(TD, "default", peer),
                )
            ],
        )

    return node, MeshView(
        destinations={
            fqdn: (table, endpoints),
            # our own certificate is productpage's: the identity check passes
            "ratings.default.svc.cluster.local": (None, via_own_inbound("ratings", "productpage")),
            # the endpoint claims another identity than the one its certificate proves
            "details.default.svc.cluster.local": (None, via_own_inbound("details", "details")),
        },
        inbound=inbound,
    )


@pytest.fixture
def app_server() -> Iterator[int]:
    yield from serve_http(_App)


def test_envoy_serves_translated_routes_and_policies(app_server: int, tmp_path: Path) -> None:
    """Envoy run on a translation answers as the Python sidecar would: direct
    responses, prefix rewrite with a withoutHeaders/authority match, destination
    header ops, a rule for other callers left out, RBAC DENY at the inbound side,
    502 for hosts outside the mesh, absolute-form requests, no XFCC for plaintext,
    mTLS with the SDS certificate and the endpoint's identity checked, XFCC set from
    the verified client certificate."""
    inbound_port, outbound_port = free_port(), free_port()
    node, view = _live_mesh(app_server, inbound_port, outbound_port)
    bootstrap = static_bootstrap(node, view, "live")
    with static_envoy(tmp_path, "live", bootstrap, (outbound_port, inbound_port)):
        status, _, body = http_get(outbound_port, "/teapot", "reviews:9080")
        assert (status, body) == (418, b"short and stout")

        status, _, body = http_get(outbound_port, "/api/items?x=1", "reviews:9080")
        seen = json.loads(body)
        assert status == 200, body
        assert seen["path"] == "/v2/items?x=1" and seen["x-subset"] == "v1"
        assert seen["xfcc"] == ""  # plaintext caller: no identity claimed for it

        status, _, body = http_get(
            outbound_port, "/api/items", "reviews.default", {"x-canary": "1"}
        )
        assert status == 200 and json.loads(body)["path"] == "/api/items"

        status, _, body = http_get(outbound_port, "/admin/x", "reviews")
        assert status == 403, body

        status, _, _ = http_get(outbound_port, "/", "example.com")
        assert status == 502

        status, _, body = http_get(outbound_port, "/r", "ratings")
        assert status == 200, body
        xfcc = json.loads(body)["xfcc"]
        assert xfcc.startswith(f"By={node.identity};Hash=") and xfcc.endswith(
            f";URI={node.identity}"
        )
        status, _, _ = http_get(outbound_port, "/d", "details")
        assert status == 503  # the peer is not who the registry says: never sent

        # absolute-form (HTTP_PROXY): the URL's host is the authority, not Host
        status, _, body = http_get(outbound_port, "http://reviews:9080/api/a", "ignored")
        assert status == 200 and json.loads(body)["path"] == "/v2/a"
        status, _, body = http_get(
            outbound_port, "http://reviews.default.svc.cluster.local/api/a", "ignored"
        )
        # `authority: {exact: reviews}` does not hold for the FQDN: the next rule
        assert status == 200 and json.loads(body)["path"] == "/api/a"
