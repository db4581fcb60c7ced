"""Read Meshwork's telemetry stream with plain nats-py: no Meshwork imports.

Every message on `<prefix>.telemetry.<kind>.<namespace>.<service>` is a MessagePack
map whose `type` key names it (`MetricBatch`, `SpanBatch`, `AccessBatch`; the schema is
documented in `mesh/telemetry.py`). Any MessagePack library decodes it; this script
uses msgspec only as a MessagePack decoder, into plain dicts and lists.

    python examples/consume_telemetry.py --nats nats://127.0.0.1:4222 [--prefix mesh]
        [--kind metrics|spans|access] [--count N] [--timeout SECONDS]

It creates its own ephemeral, ordered consumer (starting at the beginning of the
stream), so it disturbs neither the telemetry service nor other readers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import msgspec
import nats
from nats.js.api import DeliverPolicy


def summarize(message: dict[str, Any]) -> dict[str, Any]:
    kind = message.get("type")
    out: dict[str, Any] = {
        "type": kind,
        "reporter": message.get("reporter"),
        "seq": message.get("seq"),
    }
    if kind == "MetricBatch":
        requests = [s for s in message.get("series", []) if s.get("name") == "istio_requests_total"]
        out["requests"] = sum(s.get("value", 0) for s in requests)
        edges = set()
        for s in requests:
            labels = s["labels"]
            edges.add(
                f"{labels.get('source_workload')} -> {labels.get('destination_workload')} "
                f"[{labels.get('reporter')}] {labels.get('response_code')}"
            )
        out["edges"] = sorted(edges)
    elif kind == "SpanBatch":
        out["spans"] = [
            f"{s['trace_id']}/{s['span_id']} {s['kind']} {s['service']} {s['name']}"
            for s in message.get("spans", [])
        ]
    elif kind == "AccessBatch":
        out["records"] = [
            f"{r['method']} {r['authority']}{r['path']} {r['status']} {r['duration_ms']}ms"
            for r in message.get("records", [])
        ]
    return out


async def consume(url: str, prefix: str, kind: str, count: int, timeout: float) -> int:
    nc = await nats.connect(url)
    seen = 0
    try:
        js = nc.jetstream()
        sub = await js.subscribe(
            f"{prefix}.telemetry.{kind}.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        while not count or seen < count:
            try:
                msg = await sub.next_msg(timeout=timeout)
            except nats.errors.TimeoutError:
                break
            decoded = msgspec.msgpack.decode(msg.data)
            print(json.dumps({"subject": msg.subject, **summarize(decoded)}), flush=True)
            seen += 1
        await sub.unsubscribe()
    finally:
        await nc.close()
    return seen


def main() -> None:
    p = argparse.ArgumentParser(description="print Meshwork telemetry records")
    p.add_argument("--nats", default="nats://127.0.0.1:4222")
    p.add_argument("--prefix", default="mesh")
    p.add_argument("--kind", default="*", choices=["*", "metrics", "spans", "access"])
    p.add_argument("--count", type=int, default=0, help="stop after N messages (default: never)")
    p.add_argument(
        "--timeout", type=float, default=5.0, help="stop after this long without a message"
    )
    args = p.parse_args()
    asyncio.run(consume(args.nats, args.prefix, args.kind, args.count, args.timeout))


if __name__ == "__main__":
    main()
