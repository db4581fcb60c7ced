"""Envoy access-log entries -> the RequestRecord the Python data plane records."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2

from mesh.hosts import ServiceRef
from proxy.dataplane.envoy_telemetry import request_record, response_flags
from proxy.telemetry.records import UNKNOWN, Workload

ME = Workload("productpage-v1", "default", "spiffe://cluster.local/ns/default/sa/productpage",
              "productpage", "v1")  # fmt: skip
REVIEWS_V2 = Workload("reviews-v2", "default", "spiffe://cluster.local/ns/default/sa/reviews",
                      "reviews", "v2")  # fmt: skip
HOST = "productpage.default.svc.cluster.local"


def entry(**common: object) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.request.request_method = 1  # GET
    e.request.authority = "reviews:9080"
    e.request.path = "/r?x=1"
    e.request.request_id = "rid-1"
    e.request.request_headers["traceparent"] = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    e.response.response_code.value = 200
    e.response.response_body_bytes = 42
    e.common_properties.duration.FromMilliseconds(12)
    e.common_properties.start_time.FromSeconds(1_700_000_000)
    e.common_properties.upstream_cluster = "outbound|0|v2|reviews.default.svc.cluster.local"
    e.common_properties.upstream_remote_address.socket_address.address = "127.0.0.1"
    e.common_properties.upstream_remote_address.socket_address.port_value = 15006
    for name, value in common.items():
        setattr(e.common_properties.response_flags, name, value)
    return e


def lookup(ref: ServiceRef, address: str) -> Workload | None:
    assert ref == ServiceRef("default", "reviews")
    return REVIEWS_V2 if address == "127.0.0.1:15006" else None


def test_an_outbound_entry_is_reported_by_the_source() -> None:
    r = request_record(entry(), "outbound", workload=ME, service_host=HOST, destination_of=lookup)
    assert r is not None
    assert (r.reporter, r.source, r.destination) == ("source", ME, REVIEWS_V2)
    assert r.destination_service == "reviews.default.svc.cluster.local"
    assert (r.method, r.authority, r.path, r.status) == ("GET", "reviews:9080", "/r?x=1", 200)
    assert r.duration_ms == 12.0 and r.response_bytes == 42 and r.flags == "-"
    assert r.trace_id == "ab" * 16 and r.request_id == "rid-1"
    assert r.upstream_host == "127.0.0.1:15006" and r.security_policy == UNKNOWN
    assert r.start_ns == 1_700_000_000 * 1_000_000_000


def test_an_inbound_entry_names_the_caller_by_its_certificate() -> None:
    e = entry()
    san = e.common_properties.tls_properties.peer_certificate_properties.subject_alt_name.add()
    san.uri = "spiffe://cluster.local/ns/shop/sa/frontend"
    r = request_record(e, "inbound", workload=ME, service_host=HOST, destination_of=lookup)
    assert r is not None and r.reporter == "destination"
    assert r.destination == ME and r.destination_service == HOST
    assert r.source.principal == "spiffe://cluster.local/ns/shop/sa/frontend"
    assert r.source.namespace == "shop" and r.security_policy == "mutual_tls"
    plain = request_record(
        entry(), "inbound", workload=ME, service_host=HOST, destination_of=lookup
    )
    assert plain is not None and plain.security_policy == "none"
    assert plain.source == Workload()


def test_flags_use_envoys_short_names_and_unknown_logs_are_skipped() -> None:
    flags = entry(no_healthy_upstream=True, upstream_retry_limit_exceeded=True)
    assert response_flags(flags.common_properties.response_flags) == "UH,URX"
    assert request_record(entry(), "inbound_tcp", workload=ME, service_host=HOST,
                          destination_of=lookup) is None  # fmt: skip
    # no endpoint at that address: the destination is unknown, still counted
    e = entry()
    e.common_properties.upstream_remote_address.socket_address.port_value = 1
    r = request_record(e, "outbound", workload=ME, service_host=HOST, destination_of=lookup)
    assert r is not None and r.destination == Workload()


def test_a_tcp_entry_counts_bytes_as_istio_does() -> None:
    from proxy.dataplane.envoy_telemetry import tcp_record

    e = accesslog_pb2.TCPAccessLogEntry()
    e.common_properties.upstream_cluster = "outbound|6379||cache.default.svc.cluster.local"
    e.common_properties.upstream_remote_address.socket_address.address = "127.0.0.1"
    e.common_properties.upstream_remote_address.socket_address.port_value = 15006
    e.connection_properties.received_bytes = 10  # from the client: the request direction
    e.connection_properties.sent_bytes = 99  # to the client: the response direction

    def cache(ref: ServiceRef, address: str) -> Workload | None:
        return REVIEWS_V2 if ref == ServiceRef("default", "cache") else None

    found = tcp_record(e, "outbound_tcp", workload=ME, service_host=HOST, destination_of=cache)
    assert found is not None
    record, sent, received = found
    assert (record.reporter, record.source, record.destination) == ("source", ME, REVIEWS_V2)
    assert record.destination_service == "cache.default.svc.cluster.local"
    assert (sent, received) == (99, 10)
    inbound = tcp_record(e, "inbound_tcp", workload=ME, service_host=HOST, destination_of=cache)
    assert inbound is not None and inbound[0].security_policy == "none"
    assert inbound[0].destination == ME and inbound[0].destination_service == HOST
    assert tcp_record(e, "inbound", workload=ME, service_host=HOST, destination_of=cache) is None
