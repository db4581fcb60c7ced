"""OTLP export of the request metrics, the pure part: the mesh-wide totals the
telemetry service aggregates (`MetricTotals`: Istio's `istio_requests_total`,
`istio_request_duration_milliseconds`, `istio_request_bytes`, `istio_response_bytes`
and the `istio_tcp_*` counters) as one `ExportMetricsServiceRequest`.

- Counters are monotonic `Sum`s, histograms `Histogram`s with Istio's explicit bounds
  and per-bucket counts; both with cumulative temporality (the totals are cumulative,
  so an export that fails is simply superseded by the next one: nothing to retry).
- Every Istio label stays a data-point attribute under its own name, so dashboards
  built on Istio's Prometheus metrics read the same series once a collector converts
  them.
- One resource per reporting workload, the proxy that counted: `reporter="source"`
  series belong to the caller (`source_*` labels), `reporter="destination"` ones to the
  callee (`destination_*`); resource attributes `service.name` (the workload's `app`,
  else its workload name), `service.namespace`, `k8s.namespace.name`,
  `k8s.deployment.name`.
- `start_time_unix_nano` is when this exporter started (cumulative series need one);
  a new leader starts a new exporter, which a backend reads as a counter reset.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from mesh import __version__
from mesh.telemetry import (
    METRIC_HELP,
    REQUEST_BYTES,
    REQUEST_DURATION_MS,
    RESPONSE_BYTES,
    LabelKey,
    MetricTotals,
)

CUMULATIVE = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE

# UCUM units, as OpenTelemetry's semantic conventions write them
UNITS = {REQUEST_DURATION_MS: "ms", REQUEST_BYTES: "By", RESPONSE_BYTES: "By"}

# The messages come from `opentelemetry-proto` or from the older copy `xds-protos`
# installs (see otlp.py); the older one names the scope "instrumentation library".
# Field numbers are the same, so a current collector reads either.
if hasattr(metrics_pb2, "ScopeMetrics"):
    _SCOPE: Any = common_pb2.InstrumentationScope(name="meshwork.telemetry", version=__version__)

    def _scope_metrics(metrics: list[metrics_pb2.Metric]) -> dict[str, Any]:
        return {"scope_metrics": [metrics_pb2.ScopeMetrics(scope=_SCOPE, metrics=metrics)]}

else:  # pragma: no cover - depends on which package provides the messages
    _SCOPE = common_pb2.InstrumentationLibrary(name="meshwork.telemetry", version=__version__)

    def _scope_metrics(metrics: list[metrics_pb2.Metric]) -> dict[str, Any]:
        return {
            "instrumentation_library_metrics": [
                metrics_pb2.InstrumentationLibraryMetrics(
                    instrumentation_library=_SCOPE, metrics=metrics
                )
            ]
        }


def request_metrics(
    request: ExportMetricsServiceRequest,
) -> list[tuple[Resource, metrics_pb2.Metric]]:
    """Every metric of a decoded request with its resource (for receivers and tests)."""
    out: list[tuple[Resource, metrics_pb2.Metric]] = []
    for rm in request.resource_metrics:
        groups = (
            rm.scope_metrics if hasattr(rm, "scope_metrics") else rm.instrumentation_library_metrics
        )
        for group in groups:
            out.extend((rm.resource, m) for m in group.metrics)
    return out


def _kv(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def reporting_workload(labels: LabelKey) -> tuple[str, str, str]:
    """(service name, namespace, workload) of the proxy that counted a series."""
    d = dict(labels)
    side = "destination" if d.get("reporter") == "destination" else "source"
    workload = d.get(f"{side}_workload", "") or "unknown"
    app = d.get(f"{side}_app", "")
    namespace = d.get(f"{side}_workload_namespace", "")
    return (app if app and app != "unknown" else workload), namespace, workload


def resource_of_workload(service: str, namespace: str, workload: str) -> Resource:
    return Resource(
        attributes=[
            _kv("service.name", service),
            _kv("service.namespace", namespace),
            _kv("k8s.namespace.name", namespace),
            _kv("k8s.deployment.name", workload),
        ]
    )


def _attributes(labels: LabelKey) -> list[KeyValue]:
    return [_kv(k, v) for k, v in labels]


def metrics_request(
    totals: MetricTotals, start_ns: int, now_ns: int
) -> ExportMetricsServiceRequest:
    """The totals as one export request, grouped by reporting workload, metrics by
    name within each, series sorted (the same totals give the same bytes)."""
    counters: dict[tuple[str, str, str], dict[str, list[metrics_pb2.NumberDataPoint]]] = {}
    for (name, labels), value in sorted(totals.counters.items()):
        point = metrics_pb2.NumberDataPoint(
            attributes=_attributes(labels),
            start_time_unix_nano=start_ns,
            time_unix_nano=now_ns,
            as_double=value if math.isfinite(value) else 0.0,
        )
        counters.setdefault(reporting_workload(labels), {}).setdefault(name, []).append(point)
    histograms: dict[tuple[str, str, str], dict[str, list[metrics_pb2.HistogramDataPoint]]] = {}
    for (name, labels), h in sorted(totals.histograms.items(), key=lambda kv: kv[0]):
        hpoint = metrics_pb2.HistogramDataPoint(
            attributes=_attributes(labels),
            start_time_unix_nano=start_ns,
            time_unix_nano=now_ns,
            count=max(0, h.count),
            sum=h.sum if math.isfinite(h.sum) else 0.0,
            bucket_counts=[max(0, c) for c in h.counts],
            explicit_bounds=list(h.bounds),
        )
        histograms.setdefault(reporting_workload(labels), {}).setdefault(name, []).append(hpoint)
    out = ExportMetricsServiceRequest()
    for workload in sorted(set(counters) | set(histograms)):
        metrics = list(_sums(counters.get(workload, {}).items()))
        metrics += list(_histograms(histograms.get(workload, {}).items()))
        out.resource_metrics.append(
            metrics_pb2.ResourceMetrics(
                resource=resource_of_workload(*workload), **_scope_metrics(metrics)
            )
        )
    return out


def _sums(
    by_name: Iterable[tuple[str, list[metrics_pb2.NumberDataPoint]]],
) -> Iterable[metrics_pb2.Metric]:
    for name, points in sorted(by_name, key=lambda kv: kv[0]):
        yield metrics_pb2.Metric(
            name=name,
            description=METRIC_HELP.get(name, name),
            unit=UNITS.get(name, "1"),
            sum=metrics_pb2.Sum(
                data_points=points, aggregation_temporality=CUMULATIVE, is_monotonic=True
            ),
        )


def _histograms(
    by_name: Iterable[tuple[str, list[metrics_pb2.HistogramDataPoint]]],
) -> Iterable[metrics_pb2.Metric]:
    for name, points in sorted(by_name, key=lambda kv: kv[0]):
        yield metrics_pb2.Metric(
            name=name,
            description=METRIC_HELP.get(name, name),
            unit=UNITS.get(name, "1"),
            histogram=metrics_pb2.Histogram(data_points=points, aggregation_temporality=CUMULATIVE),
        )


__all__ = ["metrics_request", "reporting_workload", "request_metrics", "resource_of_workload"]
