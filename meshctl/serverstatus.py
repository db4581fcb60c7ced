"""The state of a cluster's nats-server and etcd nodes, as `meshctl status` shows it:
for NATS each node's health, connections, routes and the JetStream meta leader (from the
monitoring port); for etcd each member's health, its raft term and which one leads
(from the JSON gateway's maintenance status, which needs no credentials)."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

TIMEOUT_S = 2.0


def _get_json(url: str, body: dict[str, Any] | None = None) -> dict[str, Any] | None:
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(url, data=data, timeout=TIMEOUT_S) as r:
            return dict(json.loads(r.read()))
    except Exception:
        return None


def nats_node(name: str, url: str, monitor: str) -> dict[str, Any]:
    varz = _get_json(f"{monitor}/varz")
    health = _get_json(f"{monitor}/healthz")
    jsz = _get_json(f"{monitor}/jsz")
    routez = _get_json(f"{monitor}/routez")
    meta = (jsz or {}).get("meta_cluster") or {}
    routed = sorted({r.get("remote_name", "") for r in (routez or {}).get("routes", [])} - {""})
    return {
        "name": name,
        "url": url,
        "healthy": bool(health and health.get("status") == "ok"),
        "connections": (varz or {}).get("connections"),
        "routes_to": routed,
        "jetstream_leader": meta.get("leader", ""),
    }


def etcd_member(name: str, url: str) -> dict[str, Any]:
    status = _get_json(f"{url}/v3/maintenance/status", {})
    if status is None:
        return {"name": name, "url": url, "healthy": False, "leader": False, "raft_term": None}
    member = status.get("header", {}).get("member_id")
    return {
        "name": name,
        "url": url,
        "healthy": True,
        "leader": bool(member) and member == status.get("leader"),
        "raft_term": int(status.get("raftTerm", 0)),
    }


def servers_status(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every node named in cluster.json, probed concurrently."""
    nats_urls = list(doc.get("nats", []))
    nats_records = doc.get("servers", {}).get("nats", [])
    etcd_urls = list(doc.get("etcd", []))
    etcd_records = doc.get("servers", {}).get("etcd", [])
    with ThreadPoolExecutor(max_workers=8) as pool:
        nats = [
            pool.submit(
                nats_node,
                rec.get("name", f"nats-{i}"),
                nats_urls[i] if i < len(nats_urls) else "",
                rec.get("monitor", ""),
            )
            for i, rec in enumerate(nats_records)
        ]
        etcd = [
            pool.submit(
                etcd_member,
                etcd_records[i].get("name", f"etcd-{i}") if i < len(etcd_records) else f"etcd-{i}",
                url,
            )
            for i, url in enumerate(etcd_urls)
        ]
        return {"nats": [f.result() for f in nats], "etcd": [f.result() for f in etcd]}
