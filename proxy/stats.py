"""The proxy's own counters, exposed at the admin `/stats/prometheus`.

Envoy-style response flags say why a request failed locally: NR no route, UH no
healthy upstream, UF upstream connection failure, UC upstream connection
termination, UT upstream timeout, NC no cluster (unknown subset), DC downstream
connection termination.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from mesh import __version__
from proxy.policy import ShadowDecision

# Istio's `component` label value for sidecars and gateways
BUILD_COMPONENT = "proxy"


class ProxyStats:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Istio's build gauge (its dashboards count proxies by version with it)
        self.build = Gauge(
            "istio_build",
            "Istio component build info: 1 per proxy, tag = the Meshwork version",
            ["component", "tag"],
            registry=self.registry,
        )
        self.build.labels(BUILD_COMPONENT, __version__).set(1)
        self.requests = Counter(
            "meshwork_proxy_requests_total",
            "Requests handled by the proxy, by listener, status code and response flags",
            ["listener", "response_code", "response_flags"],
            registry=self.registry,
        )
        self.config_applied = Counter(
            "meshwork_proxy_config_applied_total",
            "Configs applied, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.config_rejected = Counter(
            "meshwork_proxy_config_rejected_total",
            "Configs rejected (kept the last good one)",
            ["kind"],
            registry=self.registry,
        )
        self.active = Gauge(
            "meshwork_proxy_active_requests",
            "Requests in flight",
            ["listener"],
            registry=self.registry,
        )
        self.authz_denied = Counter(
            "meshwork_proxy_authz_denied_total",
            "Inbound requests denied by authorization (403, flag RBAC), by the deciding "
            'policy ("none": no ALLOW policy matched)',
            ["policy"],
            registry=self.registry,
        )
        # Envoy counts shadow results per RBAC filter (`<prefix>rbac.
        # istio_dry_run_allow_shadow_allowed` / `..._shadow_denied`, Istio's stat prefix
        # for dry-run rules); one counter here, labelled like `authz_denied` above
        self.authz_dry_run = Counter(
            "meshwork_proxy_authz_dry_run_total",
            "Inbound requests and TCP connections evaluated against dry-run "
            "(istio.io/dry-run) AuthorizationPolicies, by protocol, shadow result "
            '(allowed, denied) and deciding dry-run policy ("none": no dry-run policy '
            "decided)",
            ["protocol", "result", "policy"],
            registry=self.registry,
        )
        self.destinations = Gauge(
            "meshwork_proxy_destinations", "Destinations this proxy follows", registry=self.registry
        )
        self._children: dict[tuple[str, int, str], Counter] = {}

    def count(self, listener: str, status: int, flags: str) -> None:
        key = (listener, status, flags)
        child = self._children.get(key)
        if child is None:
            child = self.requests.labels(listener, str(status), flags or "-")
            self._children[key] = child
        child.inc()

    def count_dry_run(self, protocol: str, shadow: ShadowDecision) -> None:
        """One request ("http") or connection ("tcp") with a dry-run shadow result."""
        result = "allowed" if shadow.allowed else "denied"
        self.authz_dry_run.labels(protocol, result, shadow.policy or "none").inc()
