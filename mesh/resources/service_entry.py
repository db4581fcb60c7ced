"""`ServiceEntry` (`networking.istio.io`): hosts the registry does not know, with Istio's
semantics (see docs/architecture.md §5.5).

    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: external-api, namespace: default}
    spec:
      hosts: [api.example.test]
      location: MESH_EXTERNAL          # or MESH_INTERNAL
      ports:
      - {number: 80, name: http, protocol: HTTP, targetPort: 8443}
      resolution: STATIC               # NONE | STATIC | DNS | DNS_ROUND_ROBIN
      endpoints:
      - {address: 127.0.0.1, labels: {version: v1}, ports: {http: 9443}, weight: 1}

Fields Istio has and Meshwork does not (`endpoints[].network`, `locality`,
`serviceAccount`, `subjectAltNames`) are refused with their path, as for every kind.
"""

from __future__ import annotations

import ipaddress

from mesh.resources import checks
from mesh.resources.errors import Issue, field, item, key, required
from mesh.resources.networking import Model

LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
# what a ServiceEntry port may declare (Istio's protocol names); the sidecars route
# the HTTP family, the rest is accepted as Istio does but only reachable through
# `meshctl sidecar --tcp-upstream`
PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "TLS", "TCP", "MONGO", "REDIS", "MYSQL")
MAX_ENDPOINTS = 1024


class ServicePort(Model, frozen=True):
    number: int | None = None
    protocol: str = ""
    name: str = ""
    # None = the same number
    target_port: int | None = None


class WorkloadEntry(Model, frozen=True):
    """`endpoints[]`: an address (IP or DNS name) with optional per-port-name numbers."""

    address: str = ""
    ports: dict[str, int] = {}
    labels: dict[str, str] = {}
    # None = 1, as Istio's load balancing weight
    weight: int | None = None


class EntryWorkloadSelector(Model, frozen=True):
    """ServiceEntry's `workloadSelector` (Istio's `WorkloadSelector`: `labels`)."""

    labels: dict[str, str] = {}


class ServiceEntrySpec(Model, frozen=True):
    hosts: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    ports: tuple[ServicePort, ...] = ()
    # None = MESH_EXTERNAL (Istio's default)
    location: str | None = None
    # None = NONE (Istio's default)
    resolution: str | None = None
    endpoints: tuple[WorkloadEntry, ...] = ()
    workload_selector: EntryWorkloadSelector | None = None
    export_to: tuple[str, ...] = ()


def validate_service_entry(spec: ServiceEntrySpec, path: str = "spec") -> list[Issue]:
    """Istio's ServiceEntry validation (pilot `ValidateServiceEntry`), minus what we
    refuse as unsupported."""
    out: list[Issue] = []
    resolution = spec.resolution or "NONE"
    hosts_path = field(path, "hosts")
    if not spec.hosts:
        out.append(required(hosts_path))
    for i, host in enumerate(spec.hosts):
        problem = checks.host(host)
        if problem is None and host == "*":
            problem = "must not be '*' (a ServiceEntry names the hosts it adds)"
        if problem is None and host.startswith("*") and resolution != "NONE":
            problem = f"a wildcard host needs resolution NONE, got {resolution}"
        if problem is not None:
            out.append(Issue(item(hosts_path, i), problem))
    for i, address in enumerate(spec.addresses):
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            out.append(
                Issue(item(field(path, "addresses"), i), f"must be an IP or CIDR, got {address!r}")
            )
    if spec.location is not None and spec.location not in LOCATIONS:
        out.append(_one_of(field(path, "location"), LOCATIONS, spec.location))
    if spec.resolution is not None and spec.resolution not in RESOLUTIONS:
        out.append(_one_of(field(path, "resolution"), RESOLUTIONS, spec.resolution))
    port_names = _ports(spec, field(path, "ports"), out)
    if spec.endpoints and spec.workload_selector is not None:
        out.append(Issue(path, "must set only one of endpoints or workloadSelector"))
    if spec.workload_selector is not None:
        if spec.location == "MESH_EXTERNAL":
            out.append(Issue(field(path, "workloadSelector"), "needs location MESH_INTERNAL"))
        sel_path = field(field(path, "workloadSelector"), "labels")
        if not spec.workload_selector.labels:
            out.append(Issue(sel_path, "must select at least one label"))
        _labels(spec.workload_selector.labels, sel_path, out)
    if resolution == "STATIC" and not spec.endpoints and spec.workload_selector is None:
        out.append(Issue(field(path, "endpoints"), "resolution STATIC needs endpoints"))
    if len(spec.endpoints) > MAX_ENDPOINTS:
        out.append(Issue(field(path, "endpoints"), f"must list at most {MAX_ENDPOINTS}"))
    for i, endpoint in enumerate(spec.endpoints[:MAX_ENDPOINTS]):
        _endpoint(endpoint, resolution, port_names, item(field(path, "endpoints"), i), out)
    for i, target in enumerate(spec.export_to):
        problem = None if target in ("*", ".", "~") else checks.dns_label(target)
        if problem is not None:
            out.append(Issue(item(field(path, "exportTo"), i), problem))
    return out


def _ports(spec: ServiceEntrySpec, path: str, out: list[Issue]) -> set[str]:
    names: set[str] = set()
    numbers: dict[int, int] = {}
    if not spec.ports and (spec.resolution or "NONE") != "NONE":
        out.append(Issue(path, f"resolution {spec.resolution} needs at least one port"))
    for i, port in enumerate(spec.ports):
        p_path = item(path, i)
        if port.number is None:
            out.append(required(field(p_path, "number")))
        else:
            _add(out, field(p_path, "number"), checks.port(port.number))
            if port.number in numbers:
                message = f"duplicate port number {port.number}, see ports[{numbers[port.number]}]"
                out.append(Issue(field(p_path, "number"), message))
            numbers.setdefault(port.number, i)
        if port.target_port is not None:
            _add(out, field(p_path, "targetPort"), checks.port(port.target_port))
        if not port.name:
            out.append(required(field(p_path, "name")))
        elif port.name in names:
            out.append(Issue(field(p_path, "name"), f"duplicate port name {port.name!r}"))
        names.add(port.name)
        protocol = port.protocol.upper()
        if protocol and protocol not in PROTOCOLS:
            out.append(_one_of(field(p_path, "protocol"), PROTOCOLS, port.protocol))
    return names


def _endpoint(
    endpoint: WorkloadEntry, resolution: str, port_names: set[str], path: str, out: list[Issue]
) -> None:
    address_path = field(path, "address")
    if not endpoint.address:
        out.append(required(address_path))
    elif endpoint.address.startswith("unix://"):
        out.append(Issue(address_path, "unix domain socket endpoints are not supported"))
    elif resolution == "STATIC" and not _is_ip(endpoint.address):
        out.append(
            Issue(address_path, f"resolution STATIC needs an IP address, got {endpoint.address!r}")
        )
    elif not _is_ip(endpoint.address):
        _add(out, address_path, checks.host(endpoint.address, wildcard=False))
    for name, number in endpoint.ports.items():
        p_path = key(field(path, "ports"), name)
        if name not in port_names:
            out.append(Issue(p_path, f"names no port of spec.ports, got {name!r}"))
        _add(out, p_path, checks.port(number))
    _labels(endpoint.labels, field(path, "labels"), out)
    if endpoint.weight is not None and not 0 <= endpoint.weight <= 2**32 - 1:
        out.append(Issue(field(path, "weight"), f"must be 0 or more, got {endpoint.weight}"))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _labels(labels: dict[str, str], path: str, out: list[Issue]) -> None:
    for name, value in labels.items():
        _add(out, key(path, name), checks.label_key(name) or checks.label_value(value))


def _one_of(path: str, allowed: tuple[str, ...], got: str) -> Issue:
    return Issue(path, f"must be one of {', '.join(allowed)}, got {got!r}")


def _add(out: list[Issue], path: str, problem: str | None) -> None:
    if problem is not None:
        out.append(Issue(path, problem))
