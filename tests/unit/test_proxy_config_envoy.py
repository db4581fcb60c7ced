"""`meshctl proxy-config` tables from an Envoy proxy's admin answers."""

from __future__ import annotations

from meshctl.envoy_views import endpoint_rows, is_envoy_clusters, is_envoy_dump, route_rows

DUMP = {
    "configs": [
        {"@type": "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump", "bootstrap": {}},
        {
            "@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
            "dynamic_route_configs": [
                {
                    "version_info": "9",
                    "route_config": {
                        "name": "outbound_http",
                        "virtual_hosts": [
                            {
                                "name": "reviews.default.svc.cluster.local",
                                "routes": [
                                    {
                                        "name": "jason",
                                        "match": {
                                            "prefix": "/",
                                            "headers": [{"name": "end-user"}],
                                        },
                                        "route": {"cluster": "outbound|0|v2|reviews"},
                                    },
                                    {
                                        "name": "split",
                                        "match": {"prefix": "/"},
                                        "route": {
                                            "weighted_clusters": {
                                                "clusters": [
                                                    {"name": "outbound|0|v1|reviews", "weight": 50},
                                                    {"name": "outbound|0|v3|reviews", "weight": 50},
                                                ]
                                            }
                                        },
                                    },
                                    {
                                        "name": "gone",
                                        "match": {"path": "/old"},
                                        "direct_response": {"status": 410},
                                    },
                                ],
                            }
                        ],
                    },
                }
            ],
        },
    ]
}

CLUSTERS = {
    "cluster_statuses": [
        {
            "name": "outbound|0|v1|reviews.default.svc.cluster.local",
            "host_statuses": [
                {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 9080}},
                    "stats": [{"name": "rq_active", "value": "2"}],
                    "health_status": {"eds_health_status": "HEALTHY", "failed_outlier_check": True},
                    "hostname": "reviews-v1-0",
                }
            ],
        },
        {"name": "inbound|9080||", "host_statuses": []},
    ]
}


def test_route_rows_name_the_virtual_host_rule_matches_and_target() -> None:
    assert is_envoy_dump(DUMP) and not is_envoy_dump({"destinations": {}})
    vhost = "outbound_http/reviews.default.svc.cluster.local"
    assert route_rows(DUMP) == [
        [vhost, "jason", 2, "outbound|0|v2|reviews", "9"],
        [vhost, "split", 1, "outbound|0|v1|reviews 50,outbound|0|v3|reviews 50", "9"],
        [vhost, "gone", 1, "direct-response 410", "9"],
    ]


def test_endpoint_rows_split_the_istio_cluster_name_and_show_ejection() -> None:
    assert is_envoy_clusters(CLUSTERS) and not is_envoy_clusters({"clusters": []})
    assert endpoint_rows(CLUSTERS) == [
        [
            "reviews.default.svc.cluster.local",
            "v1",
            "reviews-v1-0",
            "127.0.0.1:9080",
            "healthy",
            2,
            "EJECTED",
        ]
    ]
