"""Telemetry: consumes the `MESH_TELEMETRY` stream exactly once across replicas;
Prometheus metrics with Istio's names, service graph, traces, access records, dashboard."""

from services.telemetry.service import TelemetryService

__all__ = ["TelemetryService"]
