"""Is a passthrough destination this sidecar's own listener? (docs/architecture.md §5.5)

ALLOW_ANY forwards a request (or a CONNECT tunnel) for a host the mesh does not know
to the host and port it names. Naming the sidecar's own outbound listener
(`Host: 127.0.0.1:<outbound port>`, `localhost`, `0.0.0.0`, any address of this
host) would send it round again, each hop holding two connections, until the
process runs out of them. The outbound listener refuses those with 508 instead.

`is_local_address` is the decision on one address; `names_own_listener` resolves a
host as the forward would and asks it of every address. A name that resolves to
another address by the time the pool connects (DNS rebinding) is not caught: the
guard is against a loop an app falls into, the listener's own limits bound the rest.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Collection

__all__ = ["is_local_address", "names_own_listener"]


def is_local_address(address: str) -> bool:
    """Loopback, unspecified (which connects to this host), or bound to one of this
    host's interfaces (only those can be bound)."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


async def names_own_listener(host: str, port: int, own_ports: Collection[int]) -> bool:
    """Would connecting to `host:port` reach one of `own_ports` on this host?"""
    if port not in own_ports:
        return False
    name = host.strip("[]")
    try:
        ipaddress.ip_address(name.partition("%")[0])
        addresses = [name]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                name, port, type=socket.SOCK_STREAM
            )
        except OSError:
            return False  # the forward fails on its own
        addresses = [str(info[4][0]) for info in infos]
    return any(is_local_address(address) for address in addresses)
