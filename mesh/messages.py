"""Wire messages exchanged over NATS (MessagePack via msgspec).

Every request/reply and published state is a tagged Struct defined here (or in
`mesh.compiled` for compiled proxy config), so any language with a MessagePack
library can speak to the mesh: a message is a map whose `type` key names its Struct.
A request handler replies either with its result type or with `ErrorReply`.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# starting: registered, its app not listening yet (no traffic); draining: stopping
InstanceStatus = Literal["healthy", "starting", "draining"]


class Struct(msgspec.Struct, tag_field="type", tag=True, omit_defaults=True):
    """Base of every bus message: tagged by class name under the key `type`."""


# ---------------------------------------------------------------- errors


class ErrorReply(Struct):
    """A request that failed. `code` is HTTP-like (400 bad request, 404, 409, 503...)."""

    code: int
    message: str
    # dotted path of the offending field, when the error is about one
    field: str = ""
    # per-document errors for multi-document requests
    details: list[str] = []


# ---------------------------------------------------------------- registry


class Instance(Struct, kw_only=True):
    """One workload instance: a sidecar and its app."""

    namespace: str
    service: str
    instance: str  # unique id, e.g. "reviews-v2-7f3a"
    address: str  # host:port of the sidecar's inbound listener
    version: str = ""
    labels: dict[str, str] = {}
    service_account: str = ""
    identity: str = ""  # spiffe://<td>/ns/<ns>/sa/<sa>
    tcp_ports: list[int] = []
    # app TCP port (as a string) -> host:port of the sidecar's TCP relay for it
    tcp_listeners: dict[str, str] = {}
    # ports of `tcp_listeners` that take the client's bytes as sent, no mTLS: a
    # gateway's TCP / TLS PASSTHROUGH servers (docs/architecture.md §5.5)
    plain_tcp_ports: list[int] = []
    admin: str = ""  # http://host:port of the sidecar admin listener
    status: InstanceStatus = "healthy"


class RegisterRequest(Struct, kw_only=True):
    instance: Instance
    ttl: int = 10  # seconds the record lives without a heartbeat
    # re-register (e.g. to change status) keeping the same lease
    lease_id: int = 0


class RegisterReply(Struct):
    lease_id: int
    ttl: int
    revision: int


class HeartbeatRequest(Struct):
    lease_id: int
    namespace: str
    service: str
    instance: str


class HeartbeatReply(Struct):
    ttl: int


class DeregisterRequest(Struct):
    namespace: str
    service: str
    instance: str
    lease_id: int = 0


class DeregisterReply(Struct):
    revision: int


class Endpoint(Struct, kw_only=True):
    """What a client proxy needs of one instance of a destination."""

    instance: str
    address: str
    labels: dict[str, str] = {}
    identity: str = ""
    version: str = ""
    tcp_ports: list[int] = []
    tcp_listeners: dict[str, str] = {}
    plain_tcp_ports: list[int] = []  # as Instance.plain_tcp_ports
    status: InstanceStatus = "healthy"
    admin: str = ""


class EndpointSet(Struct, kw_only=True):
    """All instances of one service at one etcd revision (published on every change)."""

    namespace: str
    service: str
    revision: int
    endpoints: list[Endpoint] = []
    prev_revision: int = 0


class EndpointsGetRequest(Struct):
    """Empty namespace/service = all."""

    namespace: str = ""
    service: str = ""


class EndpointsGetReply(Struct):
    revision: int
    sets: list[EndpointSet] = []


class VipRequest(Struct, kw_only=True):
    """A service's virtual IP (`namespace` and `service`), or the service a virtual IP
    belongs to (`address`) (docs/architecture.md §5.4)."""

    namespace: str = ""
    service: str = ""
    address: str = ""


class VipReply(Struct, kw_only=True):
    """`address` "" / `service` "": none allocated."""

    namespace: str = ""
    service: str = ""
    address: str = ""


# ---------------------------------------------------------------- config


class ResourceDocument(Struct, kw_only=True):
    """One YAML document as parsed by the client, with where it came from."""

    source: str  # file name or "-"
    index: int  # 0-based document index within the source
    body: dict[str, Any]


class ResourceRef(Struct, kw_only=True):
    kind: str
    namespace: str
    name: str


class ApplyRequest(Struct, kw_only=True):
    documents: list[ResourceDocument]
    dry_run: bool = False
    # Unix time after which the caller no longer waits (0: none): the config service
    # refuses a request that reaches it later, e.g. held in a NATS route's TCP buffer
    # through a partition and delivered once it heals (docs/architecture.md §2.2)
    deadline_unix: float = 0.0


class AppliedResource(Struct, kw_only=True):
    ref: ResourceRef
    action: Literal["created", "configured", "unchanged"]


class ApplyReply(Struct, kw_only=True):
    revision: int
    results: list[AppliedResource] = []


class DeleteRequest(Struct, kw_only=True):
    refs: list[ResourceRef]
    deadline_unix: float = 0.0  # as ApplyRequest's


class DeleteReply(Struct, kw_only=True):
    revision: int
    deleted: list[ResourceRef] = []
    not_found: list[ResourceRef] = []


class GetResourcesRequest(Struct, kw_only=True):
    kind: str = ""  # empty = all kinds
    namespace: str = ""  # empty = all namespaces
    name: str = ""


class StoredResource(Struct, kw_only=True):
    ref: ResourceRef
    revision: int  # etcd mod_revision: the resource version
    body: dict[str, Any]  # apiVersion/kind/metadata/spec as applied


class GetResourcesReply(Struct, kw_only=True):
    revision: int
    resources: list[StoredResource] = []


class FetchRequest(Struct, kw_only=True):
    """Ask for the current compiled config of one destination or one gateway.

    `route` -> `RouteTable` of destination `name`; `gateway` -> `GatewayConfig`;
    `inbound` -> `InboundPolicy` the server sidecars of service `name` enforce;
    `meshwide` -> `MeshWideConfig` (namespace and name ignored)."""

    kind: Literal["route", "gateway", "inbound", "meshwide"] = "route"
    namespace: str
    name: str  # service name, or gateway proxy's workload name
    # labels of the requesting proxy (gateway selection)
    labels: dict[str, str] = {}


class SubscriptionStatus(Struct, kw_only=True):
    subject: str
    revision: int  # applied revision (0 = none yet)
    state: Literal["ACK", "NACK"] = "ACK"
    reason: str = ""  # why the last config was rejected
    rejected_revision: int = 0


class ProxyStatus(Struct, kw_only=True):
    """A proxy's full report: sent after every apply/reject and periodically."""

    proxy: str  # instance id
    namespace: str
    service: str
    version: str = ""
    kind: Literal["sidecar", "gateway"] = "sidecar"
    labels: dict[str, str] = {}
    subscriptions: list[SubscriptionStatus] = []
    sent_at: float = 0.0


class ProxyStatusRequest(Struct):
    """proxy-status (and, broadcast to proxies, "report now"). A large fleet's table
    outgrows one bus message: ask for one subject's rows, or a page of them."""

    subject: str = ""  # only the rows of this subject; "" all
    offset: int = 0
    limit: int = 0  # rows from `offset`; 0: all the rest
    # keyset paging: only rows after this (proxy, subject), so proxies arriving or
    # leaving between pages shift nothing (`offset` then counts from there)
    after_proxy: str = ""
    after_subject: str = ""


class RegistryResync(Struct):
    """`registry.resync`: register again now (the registry lost track of leases)."""


class ProxyStatusEntry(Struct, kw_only=True):
    proxy: str
    namespace: str
    service: str
    subject: str
    applied_revision: int
    latest_revision: int
    state: Literal["SYNCED", "STALE", "REJECTED", "NOT SENT"]
    reason: str = ""
    age_s: float = 0.0


class ProxyStatusReply(Struct, kw_only=True):
    entries: list[ProxyStatusEntry] = []
    total: int = 0  # rows matching the request's subject, before paging


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


_encoder = msgspec.msgpack.Encoder()
