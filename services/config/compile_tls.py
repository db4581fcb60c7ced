"""Pure compiler for DestinationRule `tls` and `portLevelSettings` (Istio semantics).

- `tls` compiles to `compiled.ClientTls`; `credentialName` never gets here (refused at
  apply time);
- `portLevelSettings[]`: each entry's fields replace the level's own for traffic to
  that port (Istio's `applyTrafficPolicy` per port: loadBalancer, connectionPool,
  outlierDetection, tls), so `port_level` carries whole, merged policies;
- as in Istio's `MergeTrafficPolicy`, a subset with `portLevelSettings` of its own
  replaces the destination level's list; without, the destination level's entries
  apply to the subset too (and win over the subset's top-level fields for their port).
"""

from __future__ import annotations

from collections.abc import Callable

from mesh import compiled
from mesh.resources import ClientTLSSettings, PortTrafficPolicy, TrafficPolicy

__all__ = ["compile_client_tls", "with_port_levels"]

# (the policy's own fields) -> merged compiled policy, from compile.py
MergeFields = Callable[
    [PortTrafficPolicy | TrafficPolicy, compiled.TrafficPolicy], compiled.TrafficPolicy
]


def compile_client_tls(tls: ClientTLSSettings | None) -> compiled.ClientTls | None:
    if tls is None or tls.mode is None:
        return None
    mode: compiled.UpstreamTlsMode
    if tls.mode == "DISABLE":
        mode = "DISABLE"
    elif tls.mode == "SIMPLE":
        mode = "SIMPLE"
    elif tls.mode == "MUTUAL":
        mode = "MUTUAL"
    else:
        mode = "ISTIO_MUTUAL"
    return compiled.ClientTls(
        mode=mode,
        client_certificate=tls.client_certificate,
        private_key=tls.private_key,
        ca_certificates=tls.ca_certificates,
        subject_alt_names=tuple(tls.subject_alt_names),
        sni=tls.sni.lower().rstrip("."),
        insecure_skip_verify=bool(tls.insecure_skip_verify),
    )


def with_port_levels(
    policy: TrafficPolicy,
    base: compiled.TrafficPolicy,
    inherited: tuple[compiled.PortPolicy, ...],
    merge: MergeFields,
) -> compiled.TrafficPolicy:
    """`base` (this level's merged policy) with its `port_level` entries: this level's
    `portLevelSettings` merged over `base`, or, when it has none, the inherited ones."""
    if not policy.port_level_settings:
        return _replace_ports(base, inherited)
    entries: dict[int, compiled.PortPolicy] = {}
    for port_policy in policy.port_level_settings:
        if port_policy.port is None:
            continue  # refused at apply time
        number = port_policy.port.number
        merged = merge(port_policy, base)
        entries[number] = compiled.PortPolicy(port=number, traffic_policy=merged)
    return _replace_ports(base, tuple(entries[p] for p in sorted(entries)))


def _replace_ports(
    policy: compiled.TrafficPolicy, ports: tuple[compiled.PortPolicy, ...]
) -> compiled.TrafficPolicy:
    return compiled.TrafficPolicy(
        load_balancer=policy.load_balancer,
        connection_pool=policy.connection_pool,
        outlier_detection=policy.outlier_detection,
        tls=policy.tls,
        port_level=ports,
    )
