"""The telemetry service's options (`meshctl serve telemetry --set key=value`), typed
and validated once at start-up."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, fields
from typing import Any

from mesh.errors import BadRequest
from services.telemetry.otlp_transport import PROTOCOLS, signal_url


@dataclass(frozen=True)
class TelemetrySettings:
    stream_replicas: int = 1
    stream_max_age_s: float = 3600.0
    stream_max_bytes: int = 1 << 30
    duplicate_window_s: float = 120.0
    # a delivered metrics batch not acknowledged within this is delivered again
    ack_wait_s: float = 30.0
    fetch_batch: int = 256
    # how far back a starting replica loads spans and access records
    history_s: float = 900.0
    max_traces: int = 10_000
    access_records: int = 10_000
    graph_window_s: float = 600.0
    # the dashboard's charts: this many 10 s buckets per series (360: one hour)
    series_buckets: int = 360
    # OTLP export of spans and request metrics: the collector's URL (e.g.
    # http://collector:4318; `/v1/traces` and `/v1/metrics` added, see
    # `otlp_transport.signal_url`; for grpc, http://collector:4317, https for TLS), and
    # headers sent with every export (`k=v,k2=v2`, e.g. for auth); empty: no export
    otlp_endpoint: str = ""
    otlp_headers: str = ""
    # http/protobuf | http/json | grpc (OTEL_EXPORTER_OTLP_PROTOCOL's values)
    otlp_protocol: str = "http/protobuf"
    # the request metrics go every this many seconds (from the leader only)
    otlp_metrics_interval_s: float = 60.0
    otlp_buffer_spans: int = 10_000
    otlp_batch_spans: int = 512
    otlp_max_attempts: int = 6
    otlp_backoff_cap_s: float = 10.0
    otlp_timeout_s: float = 10.0

    @property
    def otlp_url(self) -> str:
        """Where OTLP/HTTP sends spans."""
        return signal_url(self.otlp_endpoint, "traces") if self.otlp_endpoint else ""

    @property
    def otlp_header_pairs(self) -> tuple[tuple[str, str], ...]:
        return _header_pairs(self.otlp_headers)

    # ledgers idle this long are folded into their workload's archive (never less than
    # the stream's max age plus a margin: a batch still in the stream must find its ledger)
    retire_after_s: float = 0.0
    retire_interval_s: float = 60.0
    tombstone_ttl_s: float = 7 * 24 * 3600.0

    @property
    def effective_retire_after_s(self) -> float:
        return max(self.retire_after_s, self.stream_max_age_s + 600.0)

    @classmethod
    def from_options(cls, options: dict[str, str]) -> TelemetrySettings:
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in options.items():
            f = known.get(key)
            if f is None:
                raise BadRequest(
                    f"unknown telemetry option {key!r} (known: {', '.join(sorted(known))})",
                    field=key,
                )
            if f.type in ("str", str):
                values[f.name] = _checked_text(key, raw)
                continue
            kind = int if f.type in ("int", int) else float
            try:
                value = kind(raw)
            except ValueError:
                raise BadRequest(
                    f"option {key}: expected a number, got {raw!r}", field=key
                ) from None
            if value < 0 or (value == 0 and key != "retire-after-s"):
                raise BadRequest(f"option {key}: must be positive, got {raw!r}", field=key)
            values[f.name] = value
        return cls(**values)


_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}")


def _header_pairs(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for i, item in enumerate(p for p in text.split(",") if p.strip()):
        key, sep, value = item.partition("=")
        key = key.strip()
        # header values (credentials) never appear in an error: only the position
        if not sep or not _HEADER_NAME.fullmatch(key):
            raise BadRequest(
                f"option otlp-headers: entry {i + 1} is not NAME=VALUE with a header name",
                field="otlp-headers",
            )
        if any(c in value for c in "\r\n\0"):
            raise BadRequest(
                f"option otlp-headers: the value of entry {i + 1} has a control character",
                field="otlp-headers",
            )
        pairs.append((key, value.strip()))
    return tuple(pairs)


def _checked_text(key: str, raw: str) -> str:
    if key == "otlp-endpoint" and raw:
        parts = urllib.parse.urlsplit(raw)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(
                # not echoed: a URL may carry credentials
                "option otlp-endpoint: expected an http(s) URL with a host, such as "
                "http://collector:4318",
                field=key,
            )
    if key == "otlp-headers":
        _header_pairs(raw)
    if key == "otlp-protocol" and raw not in PROTOCOLS:
        raise BadRequest(
            f"option otlp-protocol: expected one of {', '.join(PROTOCOLS)}, got {raw!r}",
            field=key,
        )
    return raw
