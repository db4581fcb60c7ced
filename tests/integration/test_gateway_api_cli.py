"""`meshctl apply` of Kubernetes files as people have them (Services applied, workload
kinds skipped with how to run them) and `meshctl get httproute -o yaml` with the
Gateway API status, against the real control plane (nats-server, etcd, registry and
config services)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.messages import Instance, RegisterReply, RegisterRequest
from meshctl.main import main as meshctl
from tests.support import MeshHarness

pytestmark = pytest.mark.asyncio

# the shape of Istio's bookinfo.yaml: Service, ServiceAccount and Deployment per version
BOOKINFO_REVIEWS = """
apiVersion: v1
kind: Service
metadata:
  name: reviews-v1
  labels: {app: reviews, service: reviews}
spec:
  ports: [{port: 9080, name: http}]
  selector: {app: reviews, version: v1}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: bookinfo-reviews
  labels: {account: reviews}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: reviews-v1
  labels: {app: reviews, version: v1}
spec:
  replicas: 1
  selector: {matchLabels: {app: reviews, version: v1}}
  template:
    metadata:
      labels: {app: reviews, version: v1}
    spec:
      serviceAccountName: bookinfo-reviews
      containers:
      - name: reviews
        image: docker.io/istio/examples-bookinfo-reviews-v1:1.20.3
        ports: [{containerPort: 9080}]
"""

ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews}
spec:
  parentRefs: [{group: "", kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: dangling}
spec:
  parentRefs: [{group: "", kind: Service, name: nosuch}]
  rules:
  - backendRefs: [{name: reviews-v9, port: 9080}]
"""

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: bookinfo-gateway}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: from-elsewhere, namespace: other}
spec:
  parentRefs: [{name: bookinfo-gateway, namespace: default}]
  rules:
  - backendRefs: [{name: reviews-v1, namespace: default, port: 9080}]
"""


async def _register(mesh: MeshHarness, service: str, version: str) -> None:
    instance = Instance(
        namespace="default",
        service=service,
        instance=f"{service}-{version}-test",
        address="127.0.0.1:1",
        version=version,
        labels={"app": service, "version": version},
    )
    await mesh.bus.request(
        mesh.bus.subjects.registry_register,
        RegisterRequest(instance=instance, ttl=60),
        RegisterReply,
    )


def _conditions(doc: dict[str, Any]) -> dict[str, tuple[str, str]]:
    [parent] = doc["status"]["parents"]
    return {c["type"]: (c["status"], c["reason"]) for c in parent["conditions"]}


def _yaml_doc(out: str) -> dict[str, Any]:
    # the services log to this process's stdout too: the document starts at apiVersion
    text = out[out.index("apiVersion:") :]
    lines = []
    for line in text.splitlines():
        if line and not line.startswith(
            (" ", "-", "apiVersion", "kind", "metadata", "spec", "status")
        ):
            break
        lines.append(line)
    return dict(yaml.safe_load("\n".join(lines)))


async def test_apply_skips_workloads_and_get_shows_route_status(
    nats_server: Any,
    etcd_server: Any,
    prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as mesh:
        flags = ["--nats", mesh.nats_url, "--prefix", mesh.prefix]
        await _register(mesh, "reviews", "v1")
        bookinfo = tmp_path / "bookinfo.yaml"
        bookinfo.write_text(BOOKINFO_REVIEWS)
        assert await asyncio.to_thread(meshctl, [*flags, "apply", "-f", str(bookinfo)]) == 0
        out = capsys.readouterr().out
        assert "service/reviews-v1 created" in out, out
        assert (
            "skipped Deployment reviews-v1: run it under a sidecar: "
            "meshctl sidecar --service reviews --version v1 -- CMD"
        ) in out, out
        assert (
            "skipped ServiceAccount bookinfo-reviews: a sidecar takes its identity with "
            "--service-account bookinfo-reviews"
        ) in out, out

        # anything else unknown still refuses the whole file
        other = tmp_path / "other.yaml"
        other.write_text(BOOKINFO_REVIEWS + "---\napiVersion: v1\nkind: ConfigMap\n"
                         "metadata: {name: c}\ndata: {a: b}\n")  # fmt: skip
        assert await asyncio.to_thread(meshctl, [*flags, "apply", "-f", str(other)]) != 0
        err = capsys.readouterr().err
        assert "kind ConfigMap is not supported" in err, err

        routes = tmp_path / "routes.yaml"
        routes.write_text(ROUTES)
        assert await asyncio.to_thread(meshctl, [*flags, "apply", "-f", str(routes)]) == 0
        capsys.readouterr()
        code = await asyncio.to_thread(
            meshctl, [*flags, "get", "httproute", "reviews", "-o", "yaml"]
        )
        assert code == 0
        doc = _yaml_doc(capsys.readouterr().out)
        assert _conditions(doc) == {
            "Accepted": ("True", "Accepted"),
            "ResolvedRefs": ("True", "ResolvedRefs"),
        }
        assert doc["status"]["parents"][0]["parentRef"] == {
            "group": "",
            "kind": "Service",
            "name": "reviews",
            "port": 9080,
        }
        code = await asyncio.to_thread(meshctl, [*flags, "get", "hr", "dangling", "-o", "yaml"])
        assert code == 0
        assert _conditions(_yaml_doc(capsys.readouterr().out)) == {
            "Accepted": ("False", "NoMatchingParent"),
            "ResolvedRefs": ("False", "BackendNotFound"),
        }
        assert await asyncio.to_thread(meshctl, [*flags, "get", "httproutes"]) == 0
        table = capsys.readouterr().out
        assert "parents=reviews:9080 rules=1" in table and "parents=nosuch rules=1" in table
        # a Gateway API Gateway next to Istio's kinds, and a route its listener refuses
        gateway = tmp_path / "gateway.yaml"
        gateway.write_text(GATEWAY)
        assert await asyncio.to_thread(meshctl, [*flags, "apply", "-f", str(gateway)]) == 0
        out = capsys.readouterr().out
        assert "gateway.gateway.networking.k8s.io/bookinfo-gateway created" in out, out
        assert "httproute.gateway.networking.k8s.io/from-elsewhere created" in out, out
        code = await asyncio.to_thread(
            meshctl, [*flags, "get", "httproute", "from-elsewhere", "-n", "other", "-o", "yaml"]
        )
        assert code == 0
        assert _conditions(_yaml_doc(capsys.readouterr().out)) == {
            "Accepted": ("False", "NotAllowedByListeners"),
            "ResolvedRefs": ("True", "ResolvedRefs"),
        }
        code = await asyncio.to_thread(
            meshctl, [*flags, "get", "gateways.gateway.networking.k8s.io", "-o", "yaml"]
        )
        assert code == 0
        listing = capsys.readouterr().out
        assert "kind: Gateway" in listing and "gatewayClassName: istio" in listing, listing
        assert await asyncio.to_thread(meshctl, [*flags, "delete", "-f", str(gateway)]) == 0
        assert "gateway.gateway.networking.k8s.io/bookinfo-gateway deleted" in (
            capsys.readouterr().out
        )
        # delete -f of the same file skips the workloads too
        assert await asyncio.to_thread(meshctl, [*flags, "delete", "-f", str(bookinfo)]) == 0
        assert "service/reviews-v1 deleted" in capsys.readouterr().out
