"""`meshctl explain` against the real control plane (nats-server, etcd, registry and
config services): resources are applied, instances registered, and explain's verdicts
and exit codes checked (403 of an authorization policy, 503 NC of a subset no
DestinationRule defines, 404 NR, served)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from typing import Any

import pytest

from mesh.messages import Instance, RegisterReply, RegisterRequest
from meshctl.main import main as meshctl
from tests.support import MeshHarness, destination_rule_yaml

pytestmark = pytest.mark.asyncio

ROUTES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route:
    - destination: {host: reviews, subset: v2}
  - name: testers
    match:
    - uri: {prefix: /test}
    route:
    - destination: {host: reviews, subset: v3}
  - name: rest
    match:
    - uri: {prefix: /reviews}
    route:
    - destination: {host: reviews, subset: v1}
"""

ALLOW_PRODUCTPAGE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reviews-viewer}
spec:
  selector: {matchLabels: {app: reviews}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/productpage]}
"""


async def _register(mesh: MeshHarness, service: str, version: str, port: int) -> None:
    instance = Instance(
        namespace="default",
        service=service,
        instance=f"{service}-{version}-test",
        address=f"127.0.0.1:{port}",
        version=version,
        labels={"app": service, "version": version},
        service_account=service,
        identity=f"spiffe://cluster.local/ns/default/sa/{service}",
    )
    await mesh.bus.request(
        mesh.bus.subjects.registry_register,
        RegisterRequest(instance=instance, ttl=60),
        RegisterReply,
    )


async def _explain(mesh: MeshHarness, *argv: str) -> tuple[int, dict[str, Any]]:
    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return meshctl(["--nats", mesh.nats_url, "--prefix", mesh.prefix, *argv, "-o", "json"])

    code = await asyncio.to_thread(run)
    # the services run in this process and log to stdout too: the report is the
    # document that starts on a line of its own
    text = out.getvalue()
    start = text.index("\n{\n") + 1 if not text.startswith("{\n") else 0
    end = text.index("\n}\n", start) + 2
    return code, json.loads(text[start:end])


async def test_explain_verdicts_from_the_live_config(
    nats_server: Any, etcd_server: Any, prefix: str
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as mesh:
        await _register(mesh, "productpage", "v1", 15001)
        await _register(mesh, "ratings", "v1", 15002)
        for i, version in enumerate(("v1", "v2", "v3")):
            await _register(mesh, "reviews", version, 15010 + i)
        await mesh.apply(ROUTES + "---\n" + destination_rule_yaml("reviews"))

        # jason goes to v2, and the report says why the earlier rules did not match
        code, report = await _explain(
            mesh,
            "explain",
            "--from",
            "productpage-v1",
            "GET",
            "http://reviews:9080/reviews/0",
            "-H",
            "end-user: jason",
        )
        assert code == 0, report["verdict"]
        assert report["route"]["name"] == "jason"
        assert [d["subset"] for d in report["destinations"]] == ["v2"]
        assert [e["instance"] for e in report["destinations"][0]["endpoints"]] == [
            "reviews-v2-test"
        ]
        assert report["caller"]["principal"] == "cluster.local/ns/default/sa/productpage"

        # other users fall through to `rest`; the losing rules carry their reasons
        code, report = await _explain(
            mesh, "explain", "--from", "productpage-v1", "GET", "http://reviews:9080/reviews/0"
        )
        assert code == 0
        assert [r["reason"] for r in report["rules"]] == [
            "headers[end-user]: header absent, rule wants exact 'jason'",
            "uri: '/reviews/0' does not match prefix '/test'",
            "",
        ]

        # a route to subset v3, which the DestinationRule does not define: 503 NC
        code, report = await _explain(
            mesh, "explain", "--from", "default/productpage-v1", "GET", "http://reviews:9080/test"
        )
        assert code == 3
        verdict = report["verdict"]
        assert (verdict["status"], verdict["flag"]) == (503, "NC")
        assert "unknown subset 'v3'" in verdict["reason"]

        # no rule at all: 404 NR
        code, report = await _explain(
            mesh, "explain", "--from", "productpage", "GET", "http://reviews:9080/other"
        )
        assert code == 3
        assert (report["verdict"]["status"], report["verdict"]["flag"]) == (404, "NR")

        # an ALLOW policy for productpage only: ratings is refused 403, productpage served
        await mesh.apply(ALLOW_PRODUCTPAGE)
        code, report = await _explain(
            mesh, "explain", "--from", "ratings", "GET", "http://reviews:9080/reviews/0"
        )
        assert code == 3
        assert (report["verdict"]["status"], report["verdict"]["flag"]) == (403, "RBAC")
        endpoint = report["destinations"][0]["endpoints"][0]
        assert endpoint["authorization"]["policies"][0]["policy"] == "default/reviews-viewer"
        assert (
            "caller principal 'cluster.local/ns/default/sa/ratings' is not listed"
            in (endpoint["authorization"]["policies"][0]["why"][0])
        )
        code, report = await _explain(
            mesh, "explain", "--from", "productpage", "GET", "http://reviews:9080/reviews/0"
        )
        assert code == 0, report["verdict"]
        assert report["destinations"][0]["endpoints"][0]["authorization"]["reason"] == (
            "allowed by ALLOW policy default/reviews-viewer"
        )


async def test_explain_text_report_and_unknown_caller_error(
    nats_server: Any, etcd_server: Any, prefix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with MeshHarness(nats_server.url, etcd_server.url, prefix, ca=False) as mesh:
        await _register(mesh, "reviews", "v1", 15020)
        argv = [
            "--nats",
            mesh.nats_url,
            "--prefix",
            mesh.prefix,
            "explain",
            "--from",
            "productpage",
        ]
        code = await asyncio.to_thread(meshctl, [*argv, "GET", "http://reviews:9080/reviews/0"])
        text = capsys.readouterr().out
        assert code == 0, text
        # without a VirtualService, the default route (the whole service) is used
        assert "MATCH    http[0] default" in text
        assert "Verdict   SERVED" in text
        code = await asyncio.to_thread(meshctl, [*argv, "GET", "ftp://reviews/"])
        assert code == 1
        assert "expected http://HOST[:PORT]/PATH" in capsys.readouterr().err
