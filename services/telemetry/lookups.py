"""What the dashboard asks the rest of the control plane, over the bus: the registry's
instances of a service (`registry.get`), the resources in force (`config.get`) and the
proxies' config-sync state (`config.proxystatus`). Each answer is plain JSON for the
API; a control-plane service not answering raises `errors.Unavailable`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from mesh.bus import Bus
from mesh.messages import (
    EndpointsGetReply,
    EndpointsGetRequest,
    GetResourcesReply,
    GetResourcesRequest,
    ProxyStatusEntry,
)
from mesh.status_pages import read_proxy_status

LOOKUP_TIMEOUT_S = 2.0


def _status_json(entry: ProxyStatusEntry) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(entry)
    out.pop("type", None)
    return out


def instances_json(
    namespace: str, service: str, reply: EndpointsGetReply, status: list[ProxyStatusEntry]
) -> dict[str, Any]:
    """Instances of one service, each with its proxy's subscriptions and their sync
    state (`SYNCED`, `STALE`, `REJECTED`, `NOT SENT`)."""
    by_proxy: dict[str, list[dict[str, Any]]] = {}
    for entry in status:
        by_proxy.setdefault(entry.proxy, []).append(_status_json(entry))
    out = []
    for endpoint_set in reply.sets:
        if endpoint_set.service != service or endpoint_set.namespace != namespace:
            continue
        for e in sorted(endpoint_set.endpoints, key=lambda e: e.instance):
            subscriptions = by_proxy.get(e.instance, [])
            states = {s["state"] for s in subscriptions}
            out.append(
                {
                    "instance": e.instance,
                    "address": e.address,
                    "version": e.version,
                    "identity": e.identity,
                    "health": e.status,
                    "labels": dict(e.labels),
                    "sync": (
                        "UNKNOWN"
                        if not states
                        else "SYNCED"
                        if states == {"SYNCED"}
                        else next(
                            s for s in ("REJECTED", "STALE", "NOT SENT", "SYNCED") if s in states
                        )
                    ),
                    "subscriptions": subscriptions,
                }
            )
    return {
        "namespace": namespace,
        "service": service,
        "revision": reply.revision,
        "instances": out,
    }


def config_json(reply: GetResourcesReply, status: list[ProxyStatusEntry]) -> dict[str, Any]:
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in reply.resources:
        by_kind.setdefault(r.ref.kind, []).append(
            {
                "namespace": r.ref.namespace,
                "name": r.ref.name,
                "revision": r.revision,
                "spec": r.body.get("spec", {}),
            }
        )
    for resources in by_kind.values():
        resources.sort(key=lambda r: (r["namespace"], r["name"]))
    return {
        "revision": reply.revision,
        "kinds": dict(sorted(by_kind.items())),
        "proxies": sorted(
            (_status_json(e) for e in status), key=lambda e: (e["proxy"], e["subject"])
        ),
    }


class BusLookups:
    def __init__(self, bus: Callable[[], Bus]):
        self._bus = bus

    async def _proxy_status(self) -> list[ProxyStatusEntry]:
        bus = self._bus()
        return await read_proxy_status(bus, timeout=LOOKUP_TIMEOUT_S)

    async def instances(self, namespace: str, service: str) -> dict[str, Any]:
        bus = self._bus()
        reply = await bus.request(
            bus.subjects.registry_get,
            EndpointsGetRequest(namespace=namespace, service=service),
            EndpointsGetReply,
            timeout=LOOKUP_TIMEOUT_S,
        )
        return instances_json(namespace, service, reply, await self._proxy_status())

    async def config(self, kind: str) -> dict[str, Any]:
        bus = self._bus()
        reply = await bus.request(
            bus.subjects.config_get,
            GetResourcesRequest(kind=kind),
            GetResourcesReply,
            timeout=LOOKUP_TIMEOUT_S,
        )
        return config_json(reply, await self._proxy_status())
