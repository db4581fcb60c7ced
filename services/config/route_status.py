"""Pure: the Gateway API `status` of an HTTPRoute or GRPCRoute, computed from the
current resources and the services the mesh knows (docs/architecture.md "Gateway API
routes").

`status.parents[]` has one entry per parentRef with the Gateway API's two route
conditions:
- `Accepted`: True (reason `Accepted`) when the parent is a known Service and, if the
  parentRef names a port, the Service (as a Kubernetes Service resource) has it;
  otherwise False, `NoMatchingParent`. For a Gateway parent: `NoMatchingParent` (no
  such Gateway, or no listener with the sectionName/port), `NotAllowedByListeners`
  (their allowedRoutes refuse the route), `NoMatchingListenerHostname`.
- `ResolvedRefs`: True (`ResolvedRefs`) when every backendRef and mirror names a
  known Service; otherwise False, `BackendNotFound` naming the first one missing.
  (`InvalidKind` cannot occur: a backend of another kind is refused at apply.)

A Service is known when a Kubernetes Service resource defines it or the registry has
instances of it. There is no `lastTransitionTime` or `observedGeneration`: the status
is computed when asked, never stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from typing import Any

from mesh.hosts import ServiceRef
from mesh.resources import Resource
from mesh.resources.gateway_api import (
    GatewayAPIGatewaySpec,
    GRPCRouteSpec,
    HTTPRouteSpec,
    ParentReference,
)
from mesh.resources.kubernetes import ServiceSpec
from mesh.resources.validate_gateway_api import is_gateway_parent
from services.config.compile_gateway_api import (
    attached_listeners,
    names_gateway,
    route_hostnames,
)

__all__ = ["CONTROLLER_NAME", "route_status"]

CONTROLLER_NAME = "meshwork.io/mesh-controller"


def route_status(
    route: Resource, resources: Iterable[Resource], registered: Set[ServiceRef]
) -> dict[str, Any]:
    """The `status` of `route` (an HTTPRoute or GRPCRoute resource)."""
    spec = route.spec
    assert isinstance(spec, HTTPRouteSpec | GRPCRouteSpec)
    namespace = route.metadata.namespace
    services: dict[ServiceRef, ServiceSpec] = {}
    for r in resources:
        if isinstance(r.spec, ServiceSpec):
            services[ServiceRef(r.metadata.namespace, r.metadata.name)] = r.spec
    known = set(services) | set(registered)
    resolved = _resolved_refs(spec, namespace, known)
    gateways = [r for r in resources if isinstance(r.spec, GatewayAPIGatewaySpec)]
    parents = []
    for ref in spec.parent_refs:
        if is_gateway_parent(ref):
            accepted = _accepted_by_gateway(route, ref, gateways)
        else:
            accepted = _accepted(ref, namespace, services, known)
        parents.append(
            {
                "parentRef": _parent_ref(ref),
                "controllerName": CONTROLLER_NAME,
                "conditions": [accepted, resolved],
            }
        )
    return {"parents": parents}


def _accepted_by_gateway(
    route: Resource, ref: ParentReference, gateways: list[Resource]
) -> dict[str, str]:
    gateway = next((g for g in gateways if names_gateway(route, ref, g)), None)
    where = f"{ref.namespace or route.metadata.namespace}/{ref.name}"
    if gateway is None:
        return _condition("Accepted", False, "NoMatchingParent", f"Gateway {where} not found")
    named, allowed = attached_listeners(gateway, route, ref)
    if not named:
        message = f"no listener of Gateway {where} matches the sectionName/port"
        return _condition("Accepted", False, "NoMatchingParent", message)
    if not allowed:
        message = f"the allowedRoutes of Gateway {where}'s listeners do not admit this route"
        return _condition("Accepted", False, "NotAllowedByListeners", message)
    spec = route.spec
    assert isinstance(spec, HTTPRouteSpec | GRPCRouteSpec)
    if not any(route_hostnames(spec.hostnames, listener.hostname) for listener in allowed):
        message = f"no hostname of the route is served by Gateway {where}'s listeners"
        return _condition("Accepted", False, "NoMatchingListenerHostname", message)
    return _condition("Accepted", True, "Accepted", "Route was valid")


def _accepted(
    ref: ParentReference,
    namespace: str,
    services: dict[ServiceRef, ServiceSpec],
    known: set[ServiceRef],
) -> dict[str, str]:
    parent = ServiceRef(ref.namespace or namespace, ref.name)
    if parent not in known:
        return _condition(
            "Accepted", False, "NoMatchingParent", f"Service {parent} is not known to the mesh"
        )
    spec = services.get(parent)
    if ref.port is not None and spec is not None and spec.ports:
        if ref.port not in {p.port for p in spec.ports}:
            return _condition(
                "Accepted", False, "NoMatchingParent", f"Service {parent} has no port {ref.port}"
            )
    return _condition("Accepted", True, "Accepted", "Route was valid")


def _resolved_refs(
    spec: HTTPRouteSpec | GRPCRouteSpec, namespace: str, known: set[ServiceRef]
) -> dict[str, str]:
    for name, ns in _backends(spec):
        ref = ServiceRef(ns or namespace, name)
        if ref not in known:
            return _condition(
                "ResolvedRefs", False, "BackendNotFound", f"backend Service {ref} is not known"
            )
    return _condition("ResolvedRefs", True, "ResolvedRefs", "All references resolved")


def _backends(spec: HTTPRouteSpec | GRPCRouteSpec) -> Iterable[tuple[str, str]]:
    for rule in spec.rules:
        for backend in rule.backend_refs:
            yield backend.name, backend.namespace
        for f in rule.filters:
            if f.request_mirror is not None:
                target = f.request_mirror.backend_ref
                yield target.name, target.namespace


def _parent_ref(ref: ParentReference) -> dict[str, Any]:
    out: dict[str, Any] = {"group": ref.group, "kind": ref.kind, "name": ref.name}
    if ref.namespace:
        out["namespace"] = ref.namespace
    if ref.port is not None:
        out["port"] = ref.port
    return out


def _condition(kind: str, ok: bool, reason: str, message: str) -> dict[str, str]:
    return {
        "type": kind,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
    }
