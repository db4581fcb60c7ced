"""The sidecar's routing core: pure functions and small state machines, no I/O.

Per request, the I/O layer builds a `RequestAttrs`, calls `select_route` on the
`CompiledRoutes` of the destination (or gateway), then either answers a redirect
(`redirect_location`) or direct response, or `pick_destination`s a weighted
destination, rewrites path, authority and headers, and asks that destination's
`Balancer` (built from `subset_endpoints` and the subset's load-balancer policy) for an
endpoint, passing already-tried instances in `exclude` on retries.
"""

from .balancer import (
    Balancer,
    LeastRequestBalancer,
    RandomBalancer,
    RingHashBalancer,
    RoundRobinBalancer,
    build_balancer,
    resolve_subset,
    subset_endpoints,
)
from .errors import InvalidRouteConfig, NoDestinationError, RoutingError
from .l4 import (
    ConnectionAttrs,
    TcpTarget,
    pick_l4_destination,
    route_target,
    select_l4_route,
    tcp_target,
)
from .match import (
    MESH_GATEWAY,
    CompiledRoutes,
    RouteMatch,
    compile_gateway,
    compile_routes,
    compile_virtual_hosts,
    select_route,
)
from .pick import pick_destination, pick_weighted
from .request import HashContext, RequestAttrs
from .sni import client_hello_sni
from .transform import (
    apply_header_ops,
    apply_request_header_ops,
    apply_response_header_ops,
    redirect_location,
    request_authority,
    rewrite_path,
)

__all__ = [
    "MESH_GATEWAY",
    "Balancer",
    "CompiledRoutes",
    "ConnectionAttrs",
    "HashContext",
    "InvalidRouteConfig",
    "LeastRequestBalancer",
    "NoDestinationError",
    "RandomBalancer",
    "RequestAttrs",
    "RingHashBalancer",
    "RoundRobinBalancer",
    "RouteMatch",
    "RoutingError",
    "TcpTarget",
    "apply_header_ops",
    "apply_request_header_ops",
    "apply_response_header_ops",
    "build_balancer",
    "client_hello_sni",
    "compile_gateway",
    "compile_routes",
    "compile_virtual_hosts",
    "pick_destination",
    "pick_l4_destination",
    "pick_weighted",
    "redirect_location",
    "request_authority",
    "resolve_subset",
    "rewrite_path",
    "route_target",
    "select_l4_route",
    "select_route",
    "subset_endpoints",
    "tcp_target",
]
