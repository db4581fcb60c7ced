"""Print Meshwork's telemetry as it streams: one JSON line per record.

Reads the JetStream stream `MESH_TELEMETRY` (subjects `<prefix>.telemetry.>`) with
nats-py and decodes each message into the typed Structs of `mesh.telemetry`
(`MetricBatch`, `SpanBatch`, `AccessBatch`; the README's "Telemetry stream" section
documents every field). For a decoder without Meshwork installed, see
`consume_telemetry.py`, which reads the same MessagePack into plain maps.

    python examples/telemetry_consumer.py [--nats nats://127.0.0.1:4222] [--prefix mesh]
        [--kind metrics|spans|access] [--count N] [--timeout SECONDS] [--new]

Each line is a record with `kind` ("metric", "span" or "access") and `proxy` (the
reporting proxy's id) added. The script uses its own ephemeral ordered consumer, from
the start of the stream (`--new`: only what arrives from now on), so it disturbs
neither the telemetry service nor other readers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from typing import Any

import msgspec
import nats
import nats.errors
from nats.js.api import DeliverPolicy

from mesh.telemetry import AccessBatch, CounterDelta, MetricBatch, SpanBatch, decode


def records(message: MetricBatch | SpanBatch | AccessBatch) -> Iterator[dict[str, Any]]:
    """The records of one stream message, as plain dicts."""
    if isinstance(message, MetricBatch):
        for series in message.series:
            out: dict[str, Any] = {"kind": "metric", "proxy": message.reporter}
            out["name"], out["labels"] = series.name, series.labels
            if isinstance(series, CounterDelta):
                out["value"] = series.value
            else:
                out["count"], out["sum"] = series.count, series.sum
            yield out
    elif isinstance(message, SpanBatch):
        for span in message.spans:
            yield {"kind": "span", "proxy": message.reporter, **msgspec.to_builtins(span)}
    else:
        for record in message.records:
            yield {"kind": "access", "proxy": message.reporter, **msgspec.to_builtins(record)}


async def consume(
    url: str, prefix: str, kind: str, count: int, timeout: float, new_only: bool
) -> int:
    nc = await nats.connect(url)
    printed = 0
    try:
        js = nc.jetstream()
        sub = await js.subscribe(
            f"{prefix}.telemetry.{kind}.>",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW if new_only else DeliverPolicy.ALL,
        )
        while not count or printed < count:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except nats.errors.TimeoutError:
                break
            try:
                message = decode(msg.data)
            except msgspec.DecodeError as e:  # ValidationError included
                print(json.dumps({"subject": msg.subject, "error": str(e)}), flush=True)
                continue
            for record in records(message):
                print(json.dumps(record), flush=True)
                printed += 1
                if count and printed >= count:
                    break
        await sub.unsubscribe()
    finally:
        await nc.close()
    return printed


def main() -> None:
    p = argparse.ArgumentParser(description="print Meshwork telemetry records")
    p.add_argument("--nats", default="nats://127.0.0.1:4222")
    p.add_argument("--prefix", default="mesh", help="subject prefix of the mesh")
    p.add_argument("--kind", default="*", choices=["*", "metrics", "spans", "access"])
    p.add_argument("--count", type=int, default=0, help="stop after N records (0: never)")
    p.add_argument("--timeout", type=float, default=5.0, help="stop after this long idle")
    p.add_argument("--new", action="store_true", help="only records published from now on")
    args = p.parse_args()
    asyncio.run(consume(args.nats, args.prefix, args.kind, args.count, args.timeout, args.new))


if __name__ == "__main__":
    main()
