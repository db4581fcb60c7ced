"""Spans on Envoy sidecars: Envoy's OpenTelemetry tracer exports to the sidecar's OTLP
receiver, which records them like the Python proxy's; a request through Envoy hops is
one nested trace at the telemetry service, and the requests are counted exactly once
(access logs give the counts, the tracer only the spans)."""

from __future__ import annotations

from typing import Any

import aiohttp

from services.telemetry import TelemetryService
from tests.envoy_support import requires_envoy
from tests.support import (
    ForwardingApp,
    MeshHarness,
    eventually,
    replace_app,
    running,
    service_config,
)

pytestmark = requires_envoy
K = 3


def outbound(sc: Any) -> str:
    return f"http://127.0.0.1:{sc.ports['outbound']}"


async def test_a_request_through_envoy_hops_is_one_nested_trace_counted_once(
    nats_server, etcd_server, prefix
) -> None:
    config = service_config(nats_server.url, etcd_server.url, prefix, replica="tel-0")
    async with (
        running(TelemetryService(config)) as tel,
        MeshHarness(nats_server.url, etcd_server.url, prefix) as mesh,
    ):
        assert isinstance(tel, TelemetryService)
        base = f"http://127.0.0.1:{tel.http_port}"
        # only A samples; B and C follow the decision that arrives with the request. B's
        # app forwards `traceparent` alone (not x-request-id): the Python data plane
        # needs no more, nor does Envoy's tracer, which samples by the trace context
        # and not by the request id (`listeners.tracing`)
        await mesh.sidecar("svc-c", "v1", dataplane="envoy", trace_sampling=0)
        b = await mesh.sidecar("svc-b", "v1", dataplane="envoy", trace_sampling=0)
        await replace_app(mesh, b, ForwardingApp("http://svc-c/hello", outbound(b)))
        a = await mesh.sidecar("svc-a", "v1", app=False, dataplane="envoy", trace_sampling=100)
        trace_ids = []
        async with aiohttp.ClientSession() as session:
            # the readiness probes are answered and counted too: by edge, how many
            # were answered 200
            probes = {("svc-a", "svc-b"): 0, ("svc-b", "svc-c"): 0}

            async def through() -> bool:
                async with session.get("http://svc-b/ready", proxy=outbound(a)) as r:
                    if r.status != 200:
                        return False
                    probes[("svc-a", "svc-b")] += 1
                    if (await r.json())["next_status"] != 200:
                        return False
                    probes[("svc-b", "svc-c")] += 1
                    return True

            await eventually(through, timeout=20)
            for _ in range(K):
                async with session.get("http://svc-b/start", proxy=outbound(a)) as r:
                    assert r.status == 200
                    answer = await r.json()
                assert answer["next_status"] == 200
                trace_id = answer["headers"]["traceparent"].split("-")[1]
                assert answer["next"]["headers"]["traceparent"].split("-")[1] == trace_id
                assert answer["next"]["headers"]["traceparent"].endswith("-01")
                assert "x-meshwork-peer" not in {h.lower() for h in answer["headers"]}
                trace_ids.append(trace_id)

            # a request without a decision at a 0 % hop is not sampled; one that arrives
            # unsampled stays unsampled at a 100 % hop (the decision that arrives wins)
            async with session.get("http://svc-c/direct", proxy=outbound(b)) as r:
                assert (await r.json())["headers"]["traceparent"].endswith("-00")
            unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
            async with session.get(
                "http://svc-b/start", proxy=outbound(a), headers={"traceparent": unsampled}
            ) as r:
                answer = await r.json()
            assert answer["headers"]["traceparent"].split("-")[1] == unsampled.split("-")[1]
            assert answer["headers"]["traceparent"].endswith("-00")
            assert answer["next"]["headers"]["traceparent"].endswith("-00")

            async def whole_trace(trace_id: str) -> Any:
                async with session.get(f"{base}/api/traces/{trace_id}") as r:
                    tree = await r.json() if r.status == 200 else None
                    return tree if tree and tree["spans"] >= 4 else None

            for trace_id in trace_ids:
                tree = await eventually(lambda t=trace_id: whole_trace(t), timeout=20)
                assert tree["spans"] == 4  # one per Envoy hop, none from the access logs
                assert len(tree["roots"]) == 1
                chain = [tree["roots"][0]]
                while chain[-1]["children"]:
                    assert len(chain[-1]["children"]) == 1
                    chain.append(chain[-1]["children"][0])
                assert [(n["service"], n["kind"]) for n in chain] == [
                    ("svc-a", "client"), ("svc-b", "server"),
                    ("svc-b", "client"), ("svc-c", "server"),
                ]  # fmt: skip

            async def requests(reporter: str, source: str, destination: str) -> float:
                async with session.get(f"{base}/metrics") as r:
                    text = await r.text()
                total = 0.0
                for line in text.splitlines():
                    if (
                        line.startswith("istio_requests_total{")
                        and f'reporter="{reporter}"' in line
                        and f'source_app="{source}"' in line
                        and f'destination_app="{destination}"' in line
                        and 'response_code="200"' in line
                    ):
                        total += float(line.rsplit(" ", 1)[1])
                return total

            # each edge counted once by each side: the probes, the K sampled requests,
            # the unsampled one, and (B to C) the direct call
            expected = {
                ("svc-a", "svc-b"): probes[("svc-a", "svc-b")] + K + 1,
                ("svc-b", "svc-c"): probes[("svc-b", "svc-c")] + K + 2,
            }
            for reporter in ("source", "destination"):
                for (src, dst), want in expected.items():

                    async def counted(
                        r: str = reporter, s: str = src, d: str = dst, n: float = want
                    ) -> bool:
                        return await requests(r, s, d) == n

                    await eventually(counted, timeout=15)
