"""Resource names, Istio's where Istio has one, and the host names a service answers to."""

from __future__ import annotations

from mesh.hosts import DEFAULT_DOMAIN, service_of_host

# The Python proxy sends a service's HTTP traffic to its sidecars' inbound listener
# whatever port the caller named, so one HTTP cluster serves every port; `0` in the
# port slot of its Istio-style name says "any port".
HTTP_PORT = 0

OUTBOUND_HTTP_LISTENER = "outbound_http"
OUTBOUND_HTTP_ROUTE = "outbound_http"
INBOUND_HTTP_LISTENER = "inbound_http"
INBOUND_HTTP_ROUTE = "inbound_http"
GATEWAY_ROUTE = "gateway_http"


def outbound_cluster(fqdn: str, subset: str = "", port: int = HTTP_PORT) -> str:
    """`outbound|<port>|<subset>|<fqdn>` (Istio's naming)."""
    return f"outbound|{port}|{subset}|{fqdn}"


def inbound_cluster(port: int) -> str:
    """`inbound|<port>||`: the local app on 127.0.0.1:<port>."""
    return f"inbound|{port}||"


def outbound_tcp_listener(fqdn: str, port: int) -> str:
    return f"outbound_tcp|{port}|{fqdn}"


def inbound_tcp_listener(port: int) -> str:
    return f"inbound_tcp|{port}"


def gateway_listener(address: str, port: int) -> str:
    return f"gateway|{address}|{port}"


def service_domains(fqdn: str, caller_namespace: str) -> list[str]:
    """Every name a caller in `caller_namespace` may use for the service `fqdn`
    (`mesh.hosts.canonical_host` resolves each of them to `fqdn`): `svc` only from the
    service's own namespace, then `svc.ns`, `svc.ns.svc` and the FQDN. Ports are not
    listed: route configurations ignore the Host's port (`ignore_port_in_host_matching`),
    as the Python proxy does."""
    ref = service_of_host(fqdn)
    if ref is None:
        return [fqdn]
    names = [f"{ref.name}.{ref.namespace}", f"{ref.name}.{ref.namespace}.svc", fqdn]
    if ref.namespace == caller_namespace:
        names.insert(0, ref.name)
    assert fqdn == f"{ref.name}.{ref.namespace}.{DEFAULT_DOMAIN}"
    return names
