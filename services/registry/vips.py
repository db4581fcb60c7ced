"""Virtual IPs per service (docs/architecture.md §4, §5.4): one stable IPv4 address per
mesh service, the same for every proxy, from VIP_POOL as Istio's auto-allocation does.

Allocated by the registry when a service's first instance registers and never
changed: `/mesh/vips/services/<ns>/<svc>` -> address and `/mesh/vips/addresses/<ip>`
-> `<ns>/<svc>`, both created in one transaction that requires both absent, so two
replicas allocating at once never share an address. The first candidate is a hash of
the service's FQDN (a re-created etcd tends to give the same address), then the next
free one.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterator

from mesh import errors, validate
from mesh.hosts import ServiceRef
from mesh.store import Compare, Get, Put, Store

VIP_POOL = ipaddress.ip_network("240.240.0.0/16")
# a service's address is written once; a race on one candidate is retried on the next
MAX_ATTEMPTS = 64


def candidates(ref: ServiceRef) -> Iterator[str]:
    """The pool's usable addresses (network and broadcast left out), starting at the
    FQDN's hash."""
    size = VIP_POOL.num_addresses - 2
    start = int.from_bytes(hashlib.sha256(ref.fqdn.encode()).digest()[:4], "big") % size
    base = int(VIP_POOL.network_address) + 1
    for step in range(size):
        yield str(ipaddress.IPv4Address(base + (start + step) % size))


def service_key(store: Store, ref: ServiceRef) -> str:
    return store.key("vips", "services", ref.namespace, ref.name)


def address_key(store: Store, address: str) -> str:
    return store.key("vips", "addresses", address)


async def vip_of(store: Store, ref: ServiceRef) -> str:
    """The service's address; "" if none was allocated."""
    kv = await store.get(service_key(store, ref))
    return kv.value.decode() if kv is not None else ""


async def service_at(store: Store, address: str) -> ServiceRef | None:
    """The service `address` was allocated to, if any."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise errors.BadRequest(f"address: {address!r} is not an IPv4 address") from None
    if ip not in VIP_POOL:
        return None
    kv = await store.get(address_key(store, str(ip)))
    if kv is None:
        return None
    namespace, _, name = kv.value.decode().partition("/")
    return ServiceRef(namespace, name)


async def allocate(store: Store, ref: ServiceRef) -> str:
    """The service's address, allocating it if it has none."""
    validate.dns_label(ref.namespace, "namespace")
    validate.dns_label(ref.name, "service")
    own = service_key(store, ref)
    for attempt, address in enumerate(candidates(ref)):
        if attempt >= MAX_ATTEMPTS:
            break
        other = address_key(store, address)
        result = await store.txn(
            [Compare(own, "create", "==", 0), Compare(other, "create", "==", 0)],
            [Put(own, address.encode()), Put(other, f"{ref.namespace}/{ref.name}".encode())],
            [Get(own)],
        )
        if result.succeeded:
            return address
        existing = result.gets[0] if result.gets else []
        if existing:
            return existing[0].value.decode()
    raise errors.Unavailable(f"no virtual IP for {ref}: {MAX_ATTEMPTS} candidates taken")
