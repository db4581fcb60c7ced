"""Every NATS subject name, in one place (docs/architecture.md §3).

The prefix (default `mesh`) is configurable so two meshes can share one NATS.
"""

from __future__ import annotations

from dataclasses import dataclass

# queue groups: any replica of a service answers a request once
REGISTRY_QUEUE = "registry"
CONFIG_QUEUE = "config"
CA_QUEUE = "ca"


def _token(value: str) -> str:
    """A subject token must not contain separators or wildcards."""
    if not value or any(c in value for c in ". *>\t\r\n"):
        raise ValueError(f"invalid subject token {value!r}")
    return value


@dataclass(frozen=True)
class Subjects:
    prefix: str = "mesh"

    # registry
    @property
    def registry_register(self) -> str:
        return f"{self.prefix}.registry.register"

    @property
    def registry_deregister(self) -> str:
        return f"{self.prefix}.registry.deregister"

    @property
    def registry_heartbeat(self) -> str:
        return f"{self.prefix}.registry.heartbeat"

    @property
    def registry_get(self) -> str:
        return f"{self.prefix}.registry.get"

    @property
    def registry_vip(self) -> str:
        """A service's virtual IP, or the service of one (`VipRequest`)."""
        return f"{self.prefix}.registry.vip"

    @property
    def registry_resync(self) -> str:
        """Published by a registry leader that starts after an outage long enough for
        leases to lapse: every sidecar registers again (each after a random delay)."""
        return f"{self.prefix}.registry.resync"

    def endpoints(self, namespace: str, service: str) -> str:
        return f"{self.prefix}.registry.endpoints.{_token(namespace)}.{_token(service)}"

    @property
    def endpoints_all(self) -> str:
        return f"{self.prefix}.registry.endpoints.>"

    # config
    @property
    def config_apply(self) -> str:
        return f"{self.prefix}.config.apply"

    @property
    def config_delete(self) -> str:
        return f"{self.prefix}.config.delete"

    @property
    def config_get(self) -> str:
        return f"{self.prefix}.config.get"

    @property
    def config_fetch(self) -> str:
        return f"{self.prefix}.config.fetch"

    @property
    def config_proxy_status(self) -> str:
        """Request: the proxy-status table (any config replica answers)."""
        return f"{self.prefix}.config.proxystatus"

    def route(self, namespace: str, service: str) -> str:
        return f"{self.prefix}.config.route.{_token(namespace)}.{_token(service)}"

    @property
    def route_all(self) -> str:
        return f"{self.prefix}.config.route.>"

    def gateway(self, namespace: str, name: str) -> str:
        return f"{self.prefix}.config.gateway.{_token(namespace)}.{_token(name)}"

    @property
    def gateway_all(self) -> str:
        return f"{self.prefix}.config.gateway.>"

    @property
    def config_mesh_wide(self) -> str:
        """`MeshWideConfig`: outbound traffic policy and ServiceEntry hosts, for every proxy."""
        return f"{self.prefix}.config.meshwide"

    def inbound(self, namespace: str, service: str) -> str:
        return f"{self.prefix}.config.inbound.{_token(namespace)}.{_token(service)}"

    # proxies
    @property
    def proxy_status(self) -> str:
        return f"{self.prefix}.proxy.status"

    @property
    def proxy_status_request(self) -> str:
        """Published by a config replica that starts: every proxy reports its status
        (each after a random delay, so they do not all answer at once)."""
        return f"{self.prefix}.proxy.status.request"

    # ca
    @property
    def ca_sign(self) -> str:
        return f"{self.prefix}.ca.sign"

    @property
    def ca_bundle(self) -> str:
        return f"{self.prefix}.ca.bundle"

    @property
    def ca_bundle_get(self) -> str:
        return f"{self.prefix}.ca.bundle.get"

    @property
    def ca_rotations_get(self) -> str:
        """The stored workload rotations a sidecar's certificate has missed (asked at
        start and after every reconnect)."""
        return f"{self.prefix}.ca.rotations.get"

    def ca_rotate(self, namespace: str, service_account: str) -> str:
        return f"{self.prefix}.ca.rotate.{_token(namespace)}.{_token(service_account)}"

    @property
    def ca_rotate_all(self) -> str:
        return f"{self.prefix}.ca.rotate.all"

    # telemetry (JetStream)
    def telemetry(self, kind: str, namespace: str, service: str) -> str:
        return f"{self.prefix}.telemetry.{kind}.{_token(namespace)}.{_token(service)}"

    @property
    def telemetry_all(self) -> str:
        return f"{self.prefix}.telemetry.>"


def parse_service_subject(subject: str, base: str) -> tuple[str, str] | None:
    """`mesh.config.route.default.reviews` with base `mesh.config.route` -> (default, reviews)."""
    if not subject.startswith(base + "."):
        return None
    rest = subject[len(base) + 1 :].split(".")
    if len(rest) != 2:
        return None
    return rest[0], rest[1]
