"""Where a captured connection goes: its original destination mapped to the mesh.

Pure: `Target` (what an original destination is) and `decide` (what to do with a
connection given the target, the detected protocol and the mesh-wide outbound
traffic policy). `CaptureTargets` does the lookups: a service's virtual IP (from the
registry, `proxy.intercept.vips`) or the address of a registered instance (its
inbound listener or one of its TCP listeners).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from mesh import errors
from mesh.compiled_mesh import MeshWideConfig
from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from mesh.messages import Endpoint, EndpointsGetReply, EndpointsGetRequest
from proxy.intercept.detect import Detected

__all__ = [
    "ALLOW_ANY",
    "REGISTRY_ONLY",
    "Action",
    "CaptureContext",
    "CaptureTargets",
    "Target",
    "decide",
    "policy_of",
]

log = get_logger("proxy.intercept.targets")

REGISTRY_ONLY = "REGISTRY_ONLY"
ALLOW_ANY = "ALLOW_ANY"
# while the mesh-wide config (`MeshWideConfig.outbound_traffic_policy`) is unknown
DEFAULT_OUTBOUND_POLICY = REGISTRY_ONLY
# how long the registry's instance addresses are reused for raw-IP lookups
ADDRESSES_TTL_S = 2.0


@dataclass(frozen=True, slots=True)
class Target:
    """An original destination as the mesh knows it. `service` None: unknown."""

    service: ServiceRef | None = None
    port: int = 0  # the destination port (a service port for a virtual IP)
    # set when the destination is one instance's listener (a raw-IP connection)
    endpoint: Endpoint | None = None
    tcp_listener: str = ""  # host:port of that instance's TCP listener, if it was one


class Action(enum.Enum):
    ROUTE_HTTP = "route_http"  # to the outbound router (by Host, else the target)
    RELAY_SERVICE = "relay_service"  # TCP to one endpoint of the service's port
    RELAY_ENDPOINT = "relay_endpoint"  # TCP (mTLS) to that instance's TCP listener
    PASSTHROUGH = "passthrough"  # to the original destination, outside the mesh
    REFUSE = "refuse"  # reset (REGISTRY_ONLY)


def decide(target: Target, protocol: Detected, policy: str) -> Action:
    """The one place the outbound traffic policy decides (docs/architecture.md §5.4).

    HTTP is routed by the mesh whatever the destination: the Host names the service
    (a name the app resolved through us, or any mesh name); an unknown destination
    whose Host is not a mesh service is refused by the router under REGISTRY_ONLY.
    Under ALLOW_ANY, a destination the mesh does not know passes through as TCP
    before any parsing. Other protocols need a known destination."""
    if policy not in (REGISTRY_ONLY, ALLOW_ANY):
        raise ValueError(f"outbound traffic policy must be {REGISTRY_ONLY} or {ALLOW_ANY}")
    if target.service is None:
        if policy == ALLOW_ANY:
            return Action.PASSTHROUGH
        return Action.ROUTE_HTTP if protocol.is_http else Action.REFUSE
    if target.tcp_listener:
        return Action.RELAY_ENDPOINT
    if protocol.is_http:
        return Action.ROUTE_HTTP
    if target.endpoint is not None:
        # a raw-IP non-HTTP connection to an instance's HTTP listener: nothing to relay to
        return Action.REFUSE
    return Action.RELAY_SERVICE


def policy_of(config: MeshWideConfig | None) -> str:
    """The outbound traffic policy in force: the mesh-wide config's, REGISTRY_ONLY while
    none has been received (refusing is the safe side)."""
    return config.outbound_traffic_policy if config is not None else DEFAULT_OUTBOUND_POLICY


def target_of_endpoints(
    reply: EndpointsGetReply, host: str, port: int
) -> tuple[ServiceRef, Endpoint, str] | None:
    """The instance whose registered address or TCP listener is host:port."""
    wanted = f"{host}:{port}"
    for eps in reply.sets:
        for ep in eps.endpoints:
            if ep.address == wanted:
                return ServiceRef(eps.namespace, eps.service), ep, ""
            for listener in ep.tcp_listeners.values():
                if listener == wanted:
                    return ServiceRef(eps.namespace, eps.service), ep, listener
    return None


VipLookup = Callable[[str], Awaitable[ServiceRef | None]]


class VipNames(Protocol):
    async def address_of(self, ref: ServiceRef) -> str: ...


Request = Callable[[EndpointsGetRequest], Awaitable[EndpointsGetReply]]


@dataclass(frozen=True)
class CaptureContext:
    """What the agent gives the data plane for an intercepted app: the host side of
    the app's veth (the capture listener binds there), the destination lookups and
    the outbound traffic policy in force."""

    host: str
    targets: CaptureTargets
    port: int = 0  # 0: any (the netns form loads its rules with the port chosen)
    # the services' virtual IPs by name (Envoy's capture listener matches on them)
    vips: VipNames | None = None
    outbound_policy: Callable[[], str] = lambda: DEFAULT_OUTBOUND_POLICY


class CaptureTargets:
    """Original destination -> `Target`: a virtual IP first, then a registered
    instance's address (asked of the registry, reused for ADDRESSES_TTL_S)."""

    def __init__(
        self,
        vip_service: VipLookup,
        endpoints: Request,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.vip_service = vip_service
        self.endpoints = endpoints
        self.clock = clock
        self._addresses: tuple[float, EndpointsGetReply] | None = None

    async def resolve(self, host: str, port: int) -> Target:
        ref = await self.vip_service(host)
        if ref is not None:
            return Target(service=ref, port=port)
        now = self.clock()
        if self._addresses is None or now - self._addresses[0] > ADDRESSES_TTL_S:
            try:
                self._addresses = (now, await self.endpoints(EndpointsGetRequest()))
            except errors.MeshError as e:
                # the registry is away: unknown for now (HTTP is still routed by Host)
                log.warning("capture.addresses_unavailable", error=str(e))
                return Target(port=port)
        found = target_of_endpoints(self._addresses[1], host, port)
        if found is None:
            return Target(port=port)
        service, endpoint, listener = found
        return Target(service=service, port=port, endpoint=endpoint, tcp_listener=listener)
