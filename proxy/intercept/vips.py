"""The sidecar's view of the services' virtual IPs (asked of the registry over
`registry.vip`, signed like endpoint sets; docs/architecture.md §5.4). A virtual IP
never changes once allocated, so answers are kept; a service without one is asked
again after NEGATIVE_TTL_S."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from mesh import errors
from mesh.bus import Bus
from mesh.hosts import ServiceRef
from mesh.logs import get_logger
from mesh.messages import VipReply, VipRequest

log = get_logger("proxy.intercept.vips")

VIP_POOL = ipaddress.ip_network("240.240.0.0/16")  # services/registry/vips.py
NEGATIVE_TTL_S = 5.0
LOOKUP_TIMEOUT_S = 2.0


class VipDirectory:
    def __init__(self, bus: Bus, clock: Callable[[], float] = time.monotonic):
        self.bus = bus
        self.clock = clock
        self._by_service: dict[ServiceRef, str] = {}
        self._by_address: dict[str, ServiceRef] = {}
        self._missing: dict[object, float] = {}

    async def address_of(self, ref: ServiceRef) -> str:
        """The service's virtual IP; "" when it has none (or the registry is away)."""
        known = self._by_service.get(ref)
        if known is not None:
            return known
        if self._recently_missing(ref):
            return ""
        reply = await self._ask(VipRequest(namespace=ref.namespace, service=ref.name))
        if reply is None or not reply.address:
            self._missing[ref] = self.clock()
            return ""
        self._learn(ref, reply.address)
        return reply.address

    async def service_at(self, address: str) -> ServiceRef | None:
        """The service whose virtual IP `address` is; None for any other address."""
        known = self._by_address.get(address)
        if known is not None:
            return known
        try:
            if ipaddress.IPv4Address(address) not in VIP_POOL:
                return None
        except ValueError:
            return None
        if self._recently_missing(address):
            return None
        reply = await self._ask(VipRequest(address=address))
        if reply is None or not reply.service:
            self._missing[address] = self.clock()
            return None
        ref = ServiceRef(reply.namespace, reply.service)
        self._learn(ref, address)
        return ref

    def _learn(self, ref: ServiceRef, address: str) -> None:
        self._by_service[ref] = address
        self._by_address[address] = ref

    def _recently_missing(self, key: object) -> bool:
        when = self._missing.get(key)
        return when is not None and self.clock() - when < NEGATIVE_TTL_S

    async def _ask(self, req: VipRequest) -> VipReply | None:
        try:
            reply: VipReply = await self.bus.request(
                self.bus.subjects.registry_vip, req, VipReply, timeout=LOOKUP_TIMEOUT_S
            )
        except errors.MeshError as e:
            log.warning("vips.lookup_failed", error=str(e))
            return None
        return reply
