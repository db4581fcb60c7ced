"""The set of Envoy resources one proxy is given: the contract between the translator
(`proxy.envoy.translate`, pure) and the xDS server (`proxy.envoy.xds_server`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.config.route.v3 import route_components_pb2
from google.protobuf.message import Message

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
# virtual hosts Envoy asks for on demand (VHDS, delta xDS; architecture §5.2)
VIRTUAL_HOST = "type.googleapis.com/envoy.config.route.v3.VirtualHost"

# SDS secret names, as Istio names them: the workload's certificate and key, and the
# trust bundle (every root in force) peers are verified against
WORKLOAD_CERT = "default"
TRUST_BUNDLE = "ROOTCA"
# the cluster ALLOW_ANY sends unknown hosts to (Istio's name; `translate.egress`)
PASSTHROUGH_CLUSTER = "PassthroughCluster"


@dataclass(frozen=True)
class XdsResources:
    """Every resource of one proxy by type, each keyed by its name. A value of this
    type is a complete snapshot: the xDS server serves exactly these, so a resource
    left out is removed from Envoy."""

    listeners: dict[str, Message] = field(default_factory=dict)
    routes: dict[str, Message] = field(default_factory=dict)
    clusters: dict[str, Message] = field(default_factory=dict)
    endpoints: dict[str, Message] = field(default_factory=dict)
    secrets: dict[str, Message] = field(default_factory=dict)
    # on demand (`ProxyNode.on_demand`): the outbound virtual hosts by name, served
    # over VHDS to the Envoy that asks for them; not part of the state-of-the-world
    # snapshot (`by_type`)
    virtual_hosts: dict[str, Message] = field(default_factory=dict)
    # on demand: what a Host naming nothing known gets (502 `unknown host`, or the
    # ALLOW_ANY passthrough), the model of the virtual host served under that Host's
    # name (`proxy.dataplane.envoy_view.vhds_answer`); never served as it is (its
    # domain `*` would stop Envoy asking). Not on demand it is the catch-all of the
    # outbound route configuration, and this is None
    unknown_host: route_components_pb2.VirtualHost | None = None

    def by_type(self) -> dict[str, dict[str, Message]]:
        return {
            LISTENER: self.listeners,
            ROUTE: self.routes,
            CLUSTER: self.clusters,
            ENDPOINT: self.endpoints,
            SECRET: self.secrets,
        }
