"""`meshctl proxy-config` rows for a proxy running Envoy: its admin `/config_dump`
(route configurations) and `/clusters?format=json` (endpoints), in the same columns
as a Python proxy's."""

from __future__ import annotations

from typing import Any

ROUTES_DUMP = "type.googleapis.com/envoy.admin.v3.RoutesConfigDump"


def is_envoy_dump(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("configs"), list)


def is_envoy_clusters(data: Any) -> bool:
    return isinstance(data, dict) and "cluster_statuses" in data


def _target(route: dict[str, Any]) -> str:
    if "redirect" in route:
        return "redirect"
    if "direct_response" in route:
        return f"direct-response {route['direct_response'].get('status', '')}".strip()
    action = route.get("route", {})
    if "cluster" in action:
        return str(action["cluster"])
    weighted = action.get("weighted_clusters", {}).get("clusters", [])
    return ",".join(f"{c['name']} {c.get('weight', 0)}" for c in weighted) or "-"


def route_rows(dump: dict[str, Any]) -> list[list[Any]]:
    """DESTINATION (virtual host), RULE, MATCHES, ROUTE, REVISION (xDS version)."""
    rows: list[list[Any]] = []
    for config in dump.get("configs", []):
        if config.get("@type") != ROUTES_DUMP:
            continue
        for dynamic in config.get("dynamic_route_configs", []):
            route_config = dynamic.get("route_config", {})
            for vhost in route_config.get("virtual_hosts", []):
                for route in vhost.get("routes", []):
                    match = route.get("match", {})
                    conditions = len(match.get("headers", [])) + len(
                        match.get("query_parameters", [])
                    )
                    rows.append(
                        [
                            f"{route_config.get('name', '')}/{vhost.get('name', '')}",
                            route.get("name", ""),
                            conditions + (1 if set(match) - {"headers", "query_parameters"} else 0),
                            _target(route),
                            dynamic.get("version_info", ""),
                        ]
                    )
    return rows


def _stat(host: dict[str, Any], name: str) -> int:
    for stat in host.get("stats", []):
        if stat.get("name") == name:
            return int(stat.get("value", 0))
    return 0


def endpoint_rows(clusters: dict[str, Any]) -> list[list[Any]]:
    """DESTINATION, SUBSET, INSTANCE, ADDRESS, HEALTH, ACTIVE, OUTLIER from Envoy's
    `outbound|<port>|<subset>|<fqdn>` clusters (others, e.g. inbound, as named)."""
    rows: list[list[Any]] = []
    for cluster in clusters.get("cluster_statuses", []):
        name = str(cluster.get("name", ""))
        parts = name.split("|")
        if len(parts) == 4 and parts[0] == "outbound":
            destination, subset = parts[3], parts[2] or "-"
        else:
            destination, subset = name, "-"
        for host in cluster.get("host_statuses", []):
            address = host.get("address", {}).get("socket_address", {})
            health = host.get("health_status", {})
            ejected = bool(health.get("failed_outlier_check"))
            rows.append(
                [
                    destination,
                    subset,
                    host.get("hostname", "") or "-",
                    f"{address.get('address', '')}:{address.get('port_value', '')}",
                    str(health.get("eds_health_status", "UNKNOWN")).lower(),
                    _stat(host, "rq_active"),
                    "EJECTED" if ejected else "ok",
                ]
            )
    return rows
