"""The Kubernetes `Service` (`v1`), accepted as a mesh resource, and the workload kinds
that `meshctl apply` skips instead of refusing the file.

A Service defines a mesh host (`<name>.<namespace>.svc.cluster.local`) over the
registered instances its `selector` matches. Instances are registered by sidecars
under a service name, and every sidecar carries the label `app: <service>`; so the
selector's `app` names the registered service whose instances are selected, and its
other labels (usually `version`) narrow them. A selector without `app` could span
services the registry keeps apart, and is refused. See docs/architecture.md
"Kubernetes Services".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mesh.resources.errors import Issue, field, item
from mesh.resources.networking import Model

CORE_API_VERSION = "v1"
# the label every sidecar registers with (proxy.settings: app = --service)
APP_LABEL = "app"
SERVICE_TYPES = ("ClusterIP",)
PROTOCOLS = ("TCP",)

# kinds found next to Services in the files people have (Istio's samples, kubectl
# manifests): they describe how to run a workload, which `meshctl sidecar` does here
WORKLOAD_KINDS = (
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Pod",
    "Job",
    "CronJob",
    "ServiceAccount",
)


class ServicePort(Model, frozen=True):
    port: int
    name: str = ""
    # a number or a container port name, as in Kubernetes; kept as written
    target_port: int | str | None = None
    protocol: str = "TCP"
    app_protocol: str = ""


class ServiceSpec(Model, frozen=True):
    selector: dict[str, str] = {}
    ports: tuple[ServicePort, ...] = ()
    type: str = "ClusterIP"


def backing_service(spec: ServiceSpec) -> str:
    """The registered service whose instances the selector picks (validated: set)."""
    return spec.selector.get(APP_LABEL, "")


def is_workload(body: Mapping[str, Any]) -> bool:
    """A document describing how to run a workload (`meshctl apply` skips it)."""
    return body.get("kind") in WORKLOAD_KINDS


def skip_notice(kind: str, body: Mapping[str, Any]) -> str:
    """The line `meshctl apply` prints for a workload document it does not apply."""
    metadata = body.get("metadata")
    name = metadata.get("name", "?") if isinstance(metadata, dict) else "?"
    service = _app_label(body) or str(name)
    version = _label(body, "version")
    version_arg = f" --version {version}" if version else ""
    if kind == "ServiceAccount":
        how = f"a sidecar takes its identity with --service-account {name}"
    else:
        how = f"run it under a sidecar: meshctl sidecar --service {service}{version_arg} -- CMD"
    return f"skipped {kind} {name}: {how}"


def _app_label(body: Mapping[str, Any]) -> str:
    return _label(body, APP_LABEL)


def _label(body: Mapping[str, Any], name: str) -> str:
    """A label of the pod template (Deployment & co.) or of the object itself."""
    spec = body.get("spec")
    template = spec.get("template") if isinstance(spec, dict) else None
    for holder in (template, body):
        metadata = holder.get("metadata") if isinstance(holder, dict) else None
        labels = metadata.get("labels") if isinstance(metadata, dict) else None
        if isinstance(labels, dict) and isinstance(labels.get(name), str):
            return str(labels[name])
    return ""


def validate_service(spec: ServiceSpec, path: str = "spec") -> list[Issue]:
    from mesh.resources import checks

    out: list[Issue] = []
    selector_path = field(path, "selector")
    if not spec.selector:
        out.append(
            Issue(
                selector_path,
                "must select instances: a Service without a selector is not supported",
            )
        )
    elif APP_LABEL not in spec.selector:
        out.append(
            Issue(
                selector_path,
                "must include the label app: the mesh service whose instances it selects "
                "(every sidecar carries app=<--service>)",
            )
        )
    for name, value in spec.selector.items():
        problem = checks.label_key(name) or checks.label_value(value)
        if problem is not None:
            out.append(Issue(field(selector_path, name), problem))
    if spec.type not in SERVICE_TYPES:
        out.append(
            Issue(field(path, "type"), f"type {spec.type} is not supported (supported: ClusterIP)")
        )
    seen: set[int] = set()
    for i, port in enumerate(spec.ports):
        port_path = item(field(path, "ports"), i)
        problem = checks.port(port.port)
        if problem is not None:
            out.append(Issue(field(port_path, "port"), problem))
        if port.port in seen:
            out.append(Issue(field(port_path, "port"), f"duplicate port {port.port}"))
        seen.add(port.port)
        if port.name:
            problem = checks.dns_label(port.name)
            if problem is not None:
                out.append(Issue(field(port_path, "name"), problem))
        if port.protocol not in PROTOCOLS:
            out.append(
                Issue(
                    field(port_path, "protocol"),
                    f"protocol {port.protocol} is not supported (supported: TCP)",
                )
            )
        target = port.target_port
        if isinstance(target, int):
            problem = checks.port(target)
            if problem is not None:
                out.append(Issue(field(port_path, "targetPort"), problem))
    return out
