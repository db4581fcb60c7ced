"""The capture listener of an intercepted app on Envoy (docs/architecture.md §5.4):
where the interception rules redirect the app's outbound TCP, as Istio's
`virtualOutbound` listener (15001) receives it.

Listener filters: `original_dst` (the connection's local address becomes the original
destination, from `SO_ORIGINAL_DST`) and `http_inspector` (HTTP/1.x or h2c prior
knowledge), bounded by the same detection timeout as the Python capture listener and
disabled on the `--opaque-ports` (Istio's `filter_disabled` on the ports it knows are
not HTTP), so a server-first protocol there is relayed at once. The listener's stat
prefix is its name: its `downstream_pre_cx_timeout` counts detection timeouts.

Filter chains, as `targets.decide` on the Python data plane:
- a service's virtual IP on one of its TCP ports (a chain per virtual IP and port,
  matched before the protocol) is relayed to the service's TCP listeners
  (`outbound|<port>||<fqdn>`, as `--tcp-upstream`);
- an instance's TCP listener by its raw address (a chain per address) is relayed over
  mTLS to that listener only (`capture_endpoint|<address>|<fqdn>`, checking the
  instance's identity);
- HTTP goes to the outbound HTTP route configuration (`outbound_http`, by Host or
  `:authority`, exactly as the HTTP_PROXY listener); a request sent to an instance's
  inbound address with an IP literal as Host first gets the instance's service as
  its Host (one Lua filter with a table of the instances' addresses; the Python router
  does the same for a Host naming no mesh service), so it is routed by that service's
  route table, not pinned to the instance;
- anything else follows the mesh-wide outbound traffic policy: refused under
  REGISTRY_ONLY (`BlackHoleCluster`, Istio's name), relayed to the original
  destination under ALLOW_ANY (`OriginalDstPassthrough`, an ORIGINAL_DST cluster:
  Istio's `PassthroughCluster`, a name the HTTP_PROXY listener's dynamic forward proxy
  cluster already takes here, docs/architecture.md §5.5);
- a connection to the capture listener's own address (not redirected) is closed
  (`capture_self`, to `BlackHoleCluster`): passed through, it would come back here.
Envoy picks the most specific destination port first and never falls back to a less
specific port, so every port with chains of its own also gets the plain HTTP chain.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Iterator

import envoy.extensions.filters.http.lua.v3.lua_pb2  # noqa: F401  (the Lua filter's Any)
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from mesh.compiled import TrafficPolicy
from mesh.messages import Endpoint
from proxy.envoy.resources import XdsResources
from proxy.intercept.detect import DETECT_TIMEOUT_S

from . import clusters, listeners, tcp
from .egress import allows_any
from .model import MeshView, ProxyNode
from .names import OUTBOUND_HTTP_ROUTE
from .protos import HTTP_INSPECTOR, ORIGINAL_DST, Json, duration, parse, typed

CAPTURE_LISTENER = "virtual_outbound"
BLACKHOLE_CLUSTER = "BlackHoleCluster"
ORIGINAL_DST_PASSTHROUGH = "OriginalDstPassthrough"
HTTP_PROTOCOLS = ["http/1.0", "http/1.1", "h2c"]
LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"


def blackhole_cluster() -> cluster_pb2.Cluster:
    """A cluster with no endpoints: connections sent there are closed at once."""
    return parse(  # type: ignore[return-value]
        cluster_pb2.Cluster,
        {
            "name": BLACKHOLE_CLUSTER,
            "type": "STATIC",
            "connectTimeout": "1s",
            "loadAssignment": {"clusterName": BLACKHOLE_CLUSTER},
        },
    )


def original_dst_cluster() -> cluster_pb2.Cluster:
    """Connections to the address they were sent to (the capture listener's
    `original_dst` listener filter recovered it): ALLOW_ANY's passthrough."""
    return parse(  # type: ignore[return-value]
        cluster_pb2.Cluster,
        {
            "name": ORIGINAL_DST_PASSTHROUGH,
            "type": "ORIGINAL_DST",
            "lbPolicy": "CLUSTER_PROVIDED",
            "connectTimeout": duration(clusters.DEFAULT_CONNECT_TIMEOUT_MS),
        },
    )


def _host_port(address: str) -> tuple[str, int] | None:
    """An `IP:PORT` address split, None when it is not one (never an error here: the
    clusters' own checks name a bad endpoint address)."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _prefix(ip: str) -> Json:
    return {"addressPrefix": ip, "prefixLen": ipaddress.ip_address(ip).max_prefixlen}


def _instances(view: MeshView) -> Iterator[tuple[str, Endpoint]]:
    """(fqdn, instance) for every instance of the services followed."""
    for fqdn, (_table, endpoint_set) in sorted(view.destinations.items()):
        for ep in endpoint_set.endpoints if endpoint_set is not None else []:
            if ep.status != "starting":
                yield fqdn, ep


def tcp_chains(node: ProxyNode, view: MeshView, out: XdsResources) -> list[Json]:
    """A filter chain per (virtual IP, TCP port) of the services followed."""
    chains: list[Json] = []
    for fqdn, vip in sorted(view.vips.items()):
        _, endpoint_set = view.destinations.get(fqdn, (None, None))
        ports = sorted(
            {
                int(port)
                for ep in (endpoint_set.endpoints if endpoint_set is not None else [])
                for port in ep.tcp_listeners
            }
        )
        for port in ports:
            cluster = tcp.add_tcp_cluster(view, fqdn, port, out)
            chains.append(
                {
                    "name": f"capture_tcp|{port}|{fqdn}",
                    "filterChainMatch": {"destinationPort": port, "prefixRanges": [_prefix(vip)]},
                    "filters": [
                        listeners.tcp_proxy(
                            f"capture_tcp_{port}_{fqdn}",
                            cluster,
                            "outbound_tcp",
                            node.access_log_cluster,
                            hash_source_ip=tcp.hashes_source_ip(view, fqdn, "", port),
                        )
                    ],
                }
            )
    return chains


def _relay_of(app_port: str, ep: Endpoint) -> str:
    return ep.tcp_listeners[app_port]


def endpoint_cluster_name(fqdn: str, address: str) -> str:
    return f"capture_endpoint|{address}|{fqdn}"


def endpoint_tcp_chains(
    node: ProxyNode, view: MeshView, out: XdsResources, taken: set[tuple[str, int]]
) -> list[Json]:
    """A chain per raw address of an instance's TCP listener: relayed over mTLS to that
    listener alone (the instance's sidecar authorizes it), as the Python capture's
    RELAY_ENDPOINT. `taken`: (ip, port) pairs already matched (virtual IPs)."""
    chains: list[Json] = []
    for fqdn, ep in _instances(view):
        for app_port, relay in sorted(ep.tcp_listeners.items()):
            split = _host_port(relay)
            if split is None or split in taken:
                continue
            taken.add(split)
            name = endpoint_cluster_name(fqdn, relay)
            lb = clusters.lb_endpoints([ep], functools.partial(_relay_of, app_port), name)
            out.clusters[name] = clusters.eds_cluster(name, TrafficPolicy(), lb, http=False)
            out.endpoints[name] = clusters.load_assignment(name, lb)
            chains.append(
                {
                    "name": f"capture_endpoint_tcp|{relay}|{fqdn}",
                    "filterChainMatch": {
                        "destinationPort": split[1],
                        "prefixRanges": [_prefix(split[0])],
                    },
                    "filters": [
                        listeners.tcp_proxy(
                            f"capture_endpoint_{relay}_{fqdn}",
                            name,
                            "outbound_tcp",
                            node.access_log_cluster,
                        )
                    ],
                }
            )
    return chains


# a Host that is an IP literal (with or without a port) names no mesh service: a
# request sent to an instance's inbound address is for that instance's service (the
# Python capture's `_http_for`); anything else keeps its Host and is routed by it.
# `downstreamLocalAddress` is the original destination (`original_dst`).
HOST_OF_INSTANCE_LUA = """
local services = {%s}
function envoy_on_request(handle)
  local authority = handle:headers():get(":authority") or ""
  local name = string.gsub(authority, ":%%d+$", "")
  local ipv4 = string.match(name, "^%%d+%%.%%d+%%.%%d+%%.%%d+$")
  if ipv4 or string.match(name, "^%%[[%%x:.]+%%]$") then
    local service = services[handle:streamInfo():downstreamLocalAddress()]
    if service ~= nil then
      handle:headers():replace(":authority", service)
      handle:clearRouteCache()
    end
  end
end
"""


def instance_services(view: MeshView) -> dict[str, str]:
    """The inbound address of every instance followed (as Envoy prints a local
    address: `ip:port`, `[ip]:port`) -> its service's name."""
    found: dict[str, str] = {}
    for fqdn, ep in _instances(view):
        split = _host_port(ep.address)
        if split is None:
            continue
        ip, port = split
        key = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        found.setdefault(key, fqdn)
    return found


def _http_manager(node: ProxyNode, view: MeshView) -> Json:
    services = instance_services(view)
    filters: list[Json] = []
    if services:
        # keys are IP addresses, values service names: json.dumps quotes both as Lua
        table = ", ".join(
            f"[{json.dumps(k)}] = {json.dumps(v)}" for k, v in sorted(services.items())
        )
        filters.append(
            {
                "name": "envoy.filters.http.lua",
                "typedConfig": typed(
                    LUA, {"defaultSourceCode": {"inlineString": HOST_OF_INSTANCE_LUA % table}}
                ),
            }
        )
    filters.append(listeners.fault_filter())
    return listeners.http_connection_manager(
        "capture_http",
        route_config_name=OUTBOUND_HTTP_ROUTE,
        http_filters=filters,
        access_log_name="outbound",
        access_log_cluster=node.access_log_cluster,
        telemetry_mode=node.telemetry_mode,
        tracing=listeners.tracing(node.tracing_cluster, node.service, node.trace_sampling),
        extra={"useRemoteAddress": True},
    )


def inspector_filter(opaque_ports: tuple[int, ...]) -> Json:
    """`http_inspector`, disabled on the opaque ports (they go straight to the TCP chains)."""
    body: Json = {
        "name": "envoy.filters.listener.http_inspector",
        "typedConfig": typed(HTTP_INSPECTOR),
    }
    rules = [
        {"destinationPortRange": {"start": port, "end": port + 1}}
        for port in sorted(set(opaque_ports))
    ]
    if len(rules) == 1:
        body["filterDisabled"] = rules[0]
    elif rules:
        body["filterDisabled"] = {"orMatch": {"rules": rules}}
    return body


def add_capture(node: ProxyNode, view: MeshView, out: XdsResources) -> None:
    assert node.capture is not None
    http_chain: Json = {
        "filterChainMatch": {"applicationProtocols": HTTP_PROTOCOLS},
        "filters": [_http_manager(node, view)],
    }
    if allows_any(view):
        unknown = listeners.tcp_proxy(
            "capture_passthrough", ORIGINAL_DST_PASSTHROUGH, "outbound_tcp", node.access_log_cluster
        )
        out.clusters[ORIGINAL_DST_PASSTHROUGH] = original_dst_cluster()
    else:
        unknown = listeners.tcp_proxy(
            "capture_blackhole", BLACKHOLE_CLUSTER, "outbound_tcp", node.access_log_cluster
        )
    vip_chains = tcp_chains(node, view, out)
    taken = {
        (str(m["prefixRanges"][0]["addressPrefix"]), int(m["destinationPort"]))  # type: ignore[index]
        for m in (c["filterChainMatch"] for c in vip_chains)
    }
    specific = [*vip_chains, *endpoint_tcp_chains(node, view, out, taken)]
    # Envoy does not fall back to a less specific port: HTTP to another address on a
    # port some chain names still reaches the outbound routes
    ports = sorted({int(c["filterChainMatch"]["destinationPort"]) for c in specific})  # type: ignore[index]
    per_port_http = [
        {
            "name": f"capture_http|{port}",
            "filterChainMatch": {"destinationPort": port, "applicationProtocols": HTTP_PROTOCOLS},
            "filters": http_chain["filters"],
        }
        for port in ports
    ]
    # a connection whose original destination is this listener itself was not
    # redirected: relayed (ALLOW_ANY) or routed by a Host naming it, it would come back
    # here, round after round (the Python listener resets it, `capture._dispatch`)
    own_host, own_port = node.capture
    to_itself = {
        "name": "capture_self",
        "filterChainMatch": {"destinationPort": own_port, "prefixRanges": [_prefix(own_host)]},
        "filters": [
            listeners.tcp_proxy(
                "capture_self", BLACKHOLE_CLUSTER, "outbound_tcp", node.access_log_cluster
            )
        ],
    }
    body: Json = {
        "name": CAPTURE_LISTENER,
        "statPrefix": CAPTURE_LISTENER,
        "address": listeners.address(*node.capture),
        "listenerFilters": [
            {"name": "envoy.filters.listener.original_dst", "typedConfig": typed(ORIGINAL_DST)},
            inspector_filter(node.opaque_ports),
        ],
        "listenerFiltersTimeout": f"{DETECT_TIMEOUT_S}s",
        # a silent client (a server-first protocol) is not HTTP: the default chain
        "continueOnListenerFiltersTimeout": True,
        "filterChains": [to_itself, *specific, *per_port_http, http_chain],
        "defaultFilterChain": {"filters": [unknown]},
        "trafficDirection": "OUTBOUND",
        **listeners.NO_REUSE_PORT,
    }
    out.listeners[CAPTURE_LISTENER] = parse(listener_pb2.Listener, body)  # type: ignore[assignment]
    out.clusters[BLACKHOLE_CLUSTER] = blackhole_cluster()
