"""OTLP export against a local OTLP/HTTP receiver that decodes the protobuf: a trace
through three services arrives whole, each span once although two telemetry replicas
export, with its parent links, resource attributes and the configured auth header; a
collector answering 503 at first gets the spans after retries."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families

from services.telemetry import TelemetryService
from services.telemetry.otlp import request_spans
from tests.support import eventually, running, service_config
from tests.support_dashboard import small_mesh


class OtlpReceiver:
    """POST /v1/traces: decodes ExportTraceServiceRequest; answers 503 `fail_first` times."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.failed = 0
        self.spans: list[tuple[dict[str, str], Any]] = []
        self.auth: set[str] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        self.auth.add(request.headers.get("authorization", ""))
        body = await request.read()
        if self.failed < self.fail_first:
            self.failed += 1
            return web.Response(status=503)
        req = ExportTraceServiceRequest.FromString(body)
        for resource, span in request_spans(req):
            attrs = {kv.key: kv.value.string_value for kv in resource.attributes}
            self.spans.append((attrs, span))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[OtlpReceiver]:
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield self
        finally:
            await self.runner.cleanup()

    def trace(self, trace_id: str) -> list[tuple[dict[str, str], Any]]:
        return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]


async def exported(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            if sample.name == "meshwork_telemetry_otlp_spans_total":
                out[sample.labels["outcome"]] = sample.value
            if sample.name == "meshwork_telemetry_otlp_failures_total":
                out["failures"] = sample.value
    return out


async def test_a_trace_arrives_whole_once_across_replicas_after_retries(
    nats_server, etcd_server, prefix
) -> None:
    async with OtlpReceiver(fail_first=2).serving() as receiver:
        options = {
            "otlp-endpoint": f"http://127.0.0.1:{receiver.port}",
            "otlp-headers": "authorization=Bearer test-token",
            "otlp-backoff-cap-s": "0.5",
        }
        async with (
            small_mesh(nats_server.url, etcd_server.url, prefix, **options) as m,
            running(
                TelemetryService(
                    service_config(
                        nats_server.url, etcd_server.url, prefix, replica="tel-1", **options
                    )
                )
            ) as second,
        ):
            trace_ids = [await m.traced_chain() for _ in range(6)]

            def complete() -> bool:
                return all(len(receiver.trace(t)) >= 4 for t in trace_ids)

            await eventually(complete, timeout=30)
            await asyncio.sleep(2.0)  # a duplicate would arrive by now

            # each span exactly once, although two replicas export
            counts = Counter(s.span_id for _, s in receiver.spans)
            assert counts and set(counts.values()) == {1}, counts.most_common(3)
            assert receiver.failed == 2 and receiver.auth == {"Bearer test-token"}

            # whole, with parent links: a-client -> b-server -> b-client -> c-server
            spans = receiver.trace(trace_ids[0])
            by_id = {s.span_id: (r, s) for r, s in spans}
            (root,) = [(r, s) for r, s in spans if not s.parent_span_id]
            chain = [root]
            while True:
                children = [(r, s) for r, s in spans if s.parent_span_id == chain[-1][1].span_id]
                if not children:
                    break
                assert len(children) == 1
                chain.append(children[0])
            assert len(chain) == 4 and all(s.parent_span_id in by_id for _, s in chain[1:])
            assert [(r["service.name"], s.kind) for r, s in chain] == [
                ("svc-a", 3), ("svc-b", 2), ("svc-b", 3), ("svc-c", 2),
            ]  # fmt: skip
            resource = chain[1][0]
            assert resource["service.namespace"] == "default"
            assert resource["k8s.deployment.name"] == "svc-b-v1"
            assert resource["k8s.namespace.name"] == "default"
            assert resource["k8s.pod.name"] == resource["service.instance.id"]
            server_attrs = {kv.key: kv.value for kv in chain[1][1].attributes}
            assert server_attrs["http.request.method"].string_value == "GET"
            assert server_attrs["http.response.status_code"].int_value == 200
            assert server_attrs["url.path"].string_value == "/start"

            # the replicas' counters add up to what arrived; the failures are counted
            a, b = await exported(m.url), await exported(f"http://127.0.0.1:{second.http_port}")
            assert a["exported"] + b["exported"] == len(receiver.spans)
            assert a["failures"] + b["failures"] == 2
            assert a["dropped_buffer_full"] == b["dropped_buffer_full"] == 0
