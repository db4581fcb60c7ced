"""The telemetry service's options (`meshctl serve telemetry --set key=value`), typed
and validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from mesh.errors import BadRequest


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
