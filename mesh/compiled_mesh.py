"""The mesh-wide compiled configuration: `mesh.config.meshwide` (docs/architecture.md §5.5).

One `MeshWideConfig` for every proxy of the mesh: the MeshConfig settings that apply
to outbound traffic (`outbound_traffic_policy`, Istio's
`meshConfig.outboundTrafficPolicy.mode`) and every ServiceEntry host, each with the
route table its VirtualServices and DestinationRule compile to. Produced by
`services/config/compile_egress.py` (pure), consumed by `proxy/egress.py`.

The interception data plane reads `outbound_traffic_policy` for captured connections
to unknown destinations, as the outbound listener does for unknown hosts.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from mesh.compiled import RouteTable

OutboundMode = Literal["REGISTRY_ONLY", "ALLOW_ANY"]
Location = Literal["MESH_EXTERNAL", "MESH_INTERNAL"]
Resolution = Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"]


class EntryPort(msgspec.Struct, frozen=True, omit_defaults=True):
    number: int
    name: str
    protocol: str = "HTTP"
    # the port the endpoints listen on (the same as `number` unless set)
    target_port: int = 0


class EntryEndpoint(msgspec.Struct, frozen=True, omit_defaults=True):
    """A ServiceEntry endpoint, or (workloadSelector) a registered instance: an IP or
    DNS name, optional per-port-name numbers, labels (subsets select them), and, for
    a mesh instance, its sidecar's identity."""

    address: str
    ports: dict[str, int] = {}
    labels: dict[str, str] = {}
    weight: int = 1
    identity: str = ""


class ExternalService(msgspec.Struct, frozen=True, omit_defaults=True):
    """One host of a ServiceEntry (a ServiceEntry with N hosts gives N of these)."""

    host: str  # canonical; `*.example.com` for a wildcard (resolution NONE)
    namespace: str
    name: str  # the ServiceEntry's
    location: Location = "MESH_EXTERNAL"
    resolution: Resolution = "NONE"
    ports: tuple[EntryPort, ...] = ()
    addresses: tuple[str, ...] = ()
    endpoints: tuple[EntryEndpoint, ...] = ()
    # namespaces that see the host ("*": every one)
    export_to: tuple[str, ...] = ("*",)
    # MESH_INTERNAL `workloadSelector`: the endpoints are the registered instances of
    # the entry's namespace carrying these labels (reached over mTLS, like a service's)
    workload_selector: dict[str, str] = {}
    # VirtualService rules and DestinationRule for the host (RouteTable.service = host)
    table: RouteTable | None = None


class MeshWideConfig(msgspec.Struct, frozen=True, omit_defaults=True, tag=True):
    revision: int
    outbound_traffic_policy: OutboundMode = "REGISTRY_ONLY"
    services: tuple[ExternalService, ...] = ()
    prev_revision: int = 0
