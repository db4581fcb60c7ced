"""Envoy access-log entries -> telemetry records (pure): response flags as Envoy prints
them, both reporters' Istio labels, spans from the logged trace context, TCP
connections with periodic entries, and the ingest step that feeds the recorder."""

from __future__ import annotations

import random
from typing import Any

import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import json_format, struct_pb2

from mesh import telemetry as wire
from mesh.messages import Endpoint, EndpointSet
from proxy.envoy.access_log_convert import (
    RESPONSE_FLAG_CODES,
    AccessLogConverter,
    AccessLogError,
    LocalProxy,
    cluster_service,
    peer_metadata_filter,
    response_flags,
)
from proxy.envoy.access_log_service import AccessLogIngest
from proxy.telemetry import TelemetryRecorder, Workload, own_workload

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
PRODUCTPAGE_ID = "spiffe://cluster.local/ns/default/sa/productpage"
RATINGS_ID = "spiffe://cluster.local/ns/default/sa/ratings"
START_NS = 1_700_000_000_123_456_789
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"

REVIEWS_V2 = own_workload(
    service="reviews",
    namespace="default",
    version="v2",
    labels={"app": "reviews", "version": "v2"},
    identity="spiffe://cluster.local/ns/default/sa/reviews",
)
LOCAL = LocalProxy(
    workload=REVIEWS_V2,
    service_host=REVIEWS,
    namespace="default",
    service="reviews",
    instance="reviews-v2-abc",
)
RATINGS_SET = EndpointSet(
    namespace="default",
    service="ratings",
    revision=7,
    endpoints=[
        Endpoint(
            instance="ratings-v1-1",
            address="10.0.0.5:15006",
            labels={"app": "ratings", "version": "v1"},
            identity=RATINGS_ID,
            version="v1",
            tcp_listeners={"5432": "10.0.0.5:15432"},
        )
    ],
)


def converter() -> AccessLogConverter:
    sets = {RATINGS: RATINGS_SET}
    return AccessLogConverter(LOCAL, endpoints=sets.get, rng=random.Random(1))


def address(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=ip, port_value=port)
    )


def common(**kw: Any) -> accesslog_pb2.AccessLogCommon:
    c = accesslog_pb2.AccessLogCommon(**kw)
    c.start_time.FromNanoseconds(START_NS)
    if "duration" not in kw:
        c.duration.FromMilliseconds(12)
    return c


def peer_tls(*uris: str) -> accesslog_pb2.TLSProperties:
    tls = accesslog_pb2.TLSProperties()
    for uri in uris:
        tls.peer_certificate_properties.subject_alt_name.add(uri=uri)
    return tls


def http_entry(
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    authority: str = "ratings:9080",
    details: str = "via_upstream",
    **common_kw: Any,
) -> accesslog_pb2.HTTPAccessLogEntry:
    entry = accesslog_pb2.HTTPAccessLogEntry(
        common_properties=common(**common_kw),
        request=accesslog_pb2.HTTPRequestProperties(
            request_method=base_pb2.GET,
            authority=authority,
            path="/ratings/0?x=1",
            request_id="req-1",
            request_body_bytes=7,
            request_headers=headers or {},
        ),
        response=accesslog_pb2.HTTPResponseProperties(
            response_body_bytes=120, response_code_details=details
        ),
    )
    if status:
        entry.response.response_code.value = status
    return entry


# ---------------------------------------------------------------- response flags


def test_every_response_flags_field_has_a_code() -> None:
    """A field Envoy adds to `ResponseFlags` must not be dropped silently."""
    fields = [f.name for f in accesslog_pb2.ResponseFlags.DESCRIPTOR.fields]
    assert [name for name, _ in RESPONSE_FLAG_CODES] == fields


@pytest.mark.parametrize(("field", "code"), RESPONSE_FLAG_CODES)
def test_each_response_flag_bit_prints_envoys_short_code(field: str, code: str) -> None:
    flags = accesslog_pb2.ResponseFlags()
    if field == "unauthorized_details":
        flags.unauthorized_details.reason = (
            accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
        )
    else:
        setattr(flags, field, True)
    assert response_flags(flags) == code


@pytest.mark.parametrize(
    ("fields", "details", "expected"),
    [
        ((), "", "-"),
        ((), "via_upstream", "-"),
        (("upstream_retry_limit_exceeded", "upstream_connection_failure"), "", "UF,URX"),
        (("downstream_connection_termination", "no_healthy_upstream"), "", "UH,DC"),
        (("fault_injected", "delay_injected"), "", "DI,FI"),
        ((), "rbac_access_denied_matched_policy[none]", "RBAC"),
        (("downstream_remote_reset",), "rbac_access_denied_matched_policy[ns/p]", "DR,RBAC"),
    ],
)
def test_response_flags_join_in_envoys_order(
    fields: tuple[str, ...], details: str, expected: str
) -> None:
    flags = accesslog_pb2.ResponseFlags(**dict.fromkeys(fields, True))
    assert response_flags(flags, details) == expected


def test_external_authorization_denial_joins_in_envoys_order() -> None:
    """`unauthorized_details` is a message, not a bool: set, it prints UAEX in its
    place among the other flags."""
    flags = accesslog_pb2.ResponseFlags(rate_limited=True, downstream_remote_reset=True)
    flags.unauthorized_details.reason = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE
    assert response_flags(flags) == "RL,UAEX,DR"
    assert response_flags(accesslog_pb2.ResponseFlags(rate_limited=False)) == "-"


def test_cluster_names() -> None:
    assert cluster_service(f"outbound|0|v1|{RATINGS}") == RATINGS
    assert cluster_service(f"outbound|5432||{RATINGS}") == RATINGS
    assert cluster_service("inbound|9080||") == ""
    assert cluster_service("") == ""


# ---------------------------------------------------------------- HTTP, reporter source


def test_outbound_request_names_the_chosen_endpoint() -> None:
    entry = http_entry(
        upstream_cluster=f"outbound|0|v1|{RATINGS}",
        upstream_remote_address=address("10.0.0.5", 15006),
        headers={"x-request-id": "ignored-request-id-wins"},
    )
    record, span = converter().http("outbound", entry)
    assert span is None  # no trace context: Envoy opened no trace
    assert record.reporter == "source"
    assert record.source == REVIEWS_V2
    assert record.destination == Workload(
        name="ratings-v1",
        namespace="default",
        principal=RATINGS_ID,
        app="ratings",
        version="v1",
    )
    assert record.destination_service == RATINGS
    assert (record.method, record.authority, record.path) == (
        "GET",
        "ratings:9080",
        "/ratings/0?x=1",
    )
    assert (record.status, record.flags, record.upstream_host) == (200, "-", "10.0.0.5:15006")
    assert (record.request_bytes, record.response_bytes) == (7, 120)
    assert record.duration_ms == pytest.approx(12.0)
    assert record.start_ns == START_NS
    assert record.request_id == "req-1"
    assert record.security_policy == "unknown"  # as Istio's source reporter
    assert record.protocol == "http"


def test_outbound_no_route_takes_the_service_from_the_authority() -> None:
    entry = http_entry(
        status=404,
        authority="ratings.default:9080",
        details="route_not_found",
        response_flags=accesslog_pb2.ResponseFlags(no_route_found=True),
    )
    record, _ = converter().http("outbound", entry)
    assert (record.status, record.flags) == (404, "NR")
    assert record.destination_service == RATINGS
    assert record.destination == Workload()  # no endpoint chosen
    assert record.upstream_host == ""


def test_outbound_host_outside_the_mesh_is_unknown() -> None:
    entry = http_entry(status=502, authority="api.example.com")
    record, _ = converter().http("gateway", entry)
    assert record.reporter == "source"
    assert record.destination_service == "unknown"


def test_outbound_no_healthy_upstream_keeps_the_cluster_service() -> None:
    entry = http_entry(
        status=503,
        upstream_cluster=f"outbound|0||{RATINGS}",
        response_flags=accesslog_pb2.ResponseFlags(no_healthy_upstream=True),
    )
    record, _ = converter().http("outbound", entry)
    assert (record.status, record.flags, record.destination_service) == (503, "UH", RATINGS)
    assert record.destination == Workload()


def test_outbound_endpoint_not_listed_is_unknown() -> None:
    entry = http_entry(
        upstream_cluster=f"outbound|0||{RATINGS}",
        upstream_remote_address=address("10.9.9.9", 15006),
    )
    assert converter().http("outbound", entry).record.destination == Workload()


def test_client_reset_has_no_status_and_flag_dc() -> None:
    entry = http_entry(
        status=0,
        upstream_cluster=f"outbound|0||{RATINGS}",
        response_flags=accesslog_pb2.ResponseFlags(downstream_connection_termination=True),
    )
    record, _ = converter().http("outbound", entry)
    assert (record.status, record.flags) == (0, "DC")


def test_method_outside_envoys_enum_is_a_dash() -> None:
    entry = http_entry()
    entry.request.request_method = base_pb2.METHOD_UNSPECIFIED
    assert converter().http("outbound", entry).record.method == "-"


# ---------------------------------------------------------------- HTTP, reporter destination


def test_inbound_caller_from_certificate_and_metadata_header() -> None:
    entry = http_entry(
        authority="reviews:9080",
        tls_properties=peer_tls(PRODUCTPAGE_ID),
        upstream_cluster="inbound|9080||",
        upstream_remote_address=address("127.0.0.1", 9080),
        headers={
            # the header's namespace is not believed: the certificate's is
            "x-meshwork-peer": "workload=productpage-v1;namespace=evil;app=productpage;version=v1"
        },
    )
    record, _ = converter().http("inbound", entry)
    assert record.reporter == "destination"
    assert record.source == Workload(
        name="productpage-v1",
        namespace="default",
        principal=PRODUCTPAGE_ID,
        app="productpage",
        version="v1",
    )
    assert record.destination == REVIEWS_V2
    assert record.destination_service == REVIEWS
    assert record.security_policy == "mutual_tls"
    assert record.upstream_host == "127.0.0.1:9080"


def test_inbound_callers_stay_apart_when_their_identity_is_remembered() -> None:
    """One converter, callers taking turns: each entry is named by its own
    certificate (the SPIFFE ID is memoised per logged certificate)."""
    convert = converter()
    for uris, principal, policy in [
        ((PRODUCTPAGE_ID,), PRODUCTPAGE_ID, "mutual_tls"),
        ((RATINGS_ID,), RATINGS_ID, "mutual_tls"),
        ((), "unknown", "none"),
        (("https://example.com/x",), "unknown", "none"),
        ((PRODUCTPAGE_ID,), PRODUCTPAGE_ID, "mutual_tls"),
        ((RATINGS_ID,), RATINGS_ID, "mutual_tls"),
    ]:
        tls = {"tls_properties": peer_tls(*uris)} if uris else {}
        record, _ = convert.http("inbound", http_entry(authority="reviews", **tls))
        assert (record.source.principal, record.security_policy) == (principal, policy)


def test_inbound_plaintext_caller() -> None:
    record, _ = converter().http("inbound", http_entry(authority="reviews"))
    assert record.security_policy == "none"
    assert record.source == Workload()


@pytest.mark.parametrize(
    "uris",
    [
        (PRODUCTPAGE_ID, RATINGS_ID),  # not one identity
        ("https://example.com/x",),  # not a SPIFFE ID
        ("spiffe://cluster.local/ns/default",),  # not a workload SPIFFE ID
    ],
)
def test_inbound_certificate_without_one_spiffe_id_counts_as_no_identity(
    uris: tuple[str, ...],
) -> None:
    entry = http_entry(authority="reviews", tls_properties=peer_tls(*uris))
    record, _ = converter().http("inbound", entry)
    assert record.security_policy == "none"
    assert record.source.principal == "unknown"


def test_inbound_rbac_denial_is_flagged_as_the_python_proxy_does() -> None:
    entry = http_entry(
        status=403,
        authority="reviews",
        details="rbac_access_denied_matched_policy[default/deny-admin[0]]",
        tls_properties=peer_tls(PRODUCTPAGE_ID),
    )
    record, _ = converter().http("inbound", entry)
    assert (record.status, record.flags) == (403, "RBAC")


GRPC = {"content-type": "application/grpc"}


@pytest.mark.parametrize(
    ("headers", "response_headers", "trailers", "protocol", "grpc_status"),
    [
        # an answer from the app: the status in its trailers
        (GRPC, {}, {"grpc-status": "14"}, "grpc", "14"),
        # Envoy's trailers-only local reply (an RBAC denial): the status in the headers
        (GRPC, {"grpc-status": "7"}, {}, "grpc", "7"),
        ({"content-type": "application/grpc+proto"}, {}, {"grpc-status": "0"}, "grpc", "0"),
        # a gRPC request whose answer had no status at all (a reset)
        (GRPC, {}, {}, "grpc", ""),
        ({"content-type": "application/json"}, {}, {}, "http", ""),
        ({}, {}, {}, "http", ""),
    ],
)
def test_grpc_requests_carry_their_protocol_and_grpc_status(
    headers: dict[str, str],
    response_headers: dict[str, str],
    trailers: dict[str, str],
    protocol: str,
    grpc_status: str,
) -> None:
    entry = http_entry(headers=headers, upstream_cluster=f"outbound|0||{RATINGS}")
    entry.response.response_headers.update(response_headers)
    entry.response.response_trailers.update(trailers)
    record, _ = converter().http("outbound", entry)
    assert (record.protocol, record.grpc_status) == (protocol, grpc_status)


def test_dry_run_result_from_shadow_rbac_metadata() -> None:
    entry = http_entry(authority="reviews")
    meta = struct_pb2.Struct()
    meta.update(
        {
            "istio_dry_run_allow_shadow_engine_result": "allowed",
            "istio_dry_run_deny_shadow_engine_result": "denied",
            "istio_dry_run_deny_shadow_effective_policy_id": "default/no-admin[0]",
        }
    )
    entry.common_properties.metadata.filter_metadata["envoy.filters.http.rbac"].CopyFrom(meta)
    record, _ = converter().http("inbound", entry)
    assert (record.dry_run_result, record.dry_run_policy) == ("denied", "default/no-admin")


def test_unknown_log_name_is_an_error_naming_it() -> None:
    with pytest.raises(AccessLogError, match="'sideways'"):
        converter().http("sideways", http_entry())
    with pytest.raises(AccessLogError, match="'inbound'"):
        converter().tcp("inbound", accesslog_pb2.TCPAccessLogEntry())


# ---------------------------------------------------------------- spans


@pytest.mark.parametrize(
    ("headers", "trace_id", "parent"),
    [
        ({"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}, TRACE_ID, PARENT_ID),
        (
            {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
            TRACE_ID,
            PARENT_ID,
        ),
        ({"b3": f"{TRACE_ID[16:]}-{PARENT_ID}-1"}, "0" * 16 + TRACE_ID[16:], PARENT_ID),
    ],
)
def test_sampled_request_gives_a_span_of_this_hop(
    headers: dict[str, str], trace_id: str, parent: str
) -> None:
    entry = http_entry(
        status=503,
        headers=headers,
        upstream_cluster=f"outbound|0||{RATINGS}",
        upstream_remote_address=address("10.0.0.5", 15006),
        response_flags=accesslog_pb2.ResponseFlags(upstream_connection_failure=True),
    )
    record, span = converter().http("outbound", entry)
    assert span is not None
    assert record.trace_id == trace_id == span.trace_id
    assert span.parent_span_id == parent and span.span_id != parent and len(span.span_id) == 16
    assert span.kind == "client"
    assert (span.service, span.namespace, span.instance) == ("reviews", "default", "reviews-v2-abc")
    assert (span.start_ns, span.end_ns) == (START_NS, START_NS + 12_000_000)
    assert (span.status_code, span.error) == (503, True)
    assert span.name == "ratings:9080/*"
    assert span.attributes["response_flags"] == "UF"
    assert span.attributes["peer.workload"] == "ratings-v1"


def test_inbound_sampled_request_gives_a_server_span() -> None:
    entry = http_entry(
        authority="reviews", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    )
    _, span = converter().http("inbound", entry)
    assert span is not None and span.kind == "server" and not span.error


def test_unsampled_request_opens_no_span_but_keeps_its_trace_id() -> None:
    entry = http_entry(headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    record, span = converter().http("outbound", entry)
    assert span is None
    assert record.trace_id == TRACE_ID


# ---------------------------------------------------------------- TCP


def tcp_entry(
    *, sent: int, received: int, stream_id: str = "", periodic: bool = False, **kw: Any
) -> accesslog_pb2.TCPAccessLogEntry:
    c = common(stream_id=stream_id, **kw)
    if periodic:
        c.access_log_type = accesslog_pb2.TcpPeriodic
    return accesslog_pb2.TCPAccessLogEntry(
        common_properties=c,
        connection_properties=accesslog_pb2.ConnectionProperties(
            sent_bytes=sent, received_bytes=received
        ),
    )


def test_outbound_tcp_connection_opened_and_closed_with_its_bytes() -> None:
    entry = tcp_entry(
        sent=300,
        received=40,
        upstream_cluster=f"outbound|5432||{RATINGS}",
        upstream_remote_address=address("10.0.0.5", 15432),
    )
    record, opened, closed, sent, received = converter().tcp("outbound_tcp", entry)
    assert (opened, closed, sent, received) == (True, True, 300, 40)
    assert record.reporter == "source"
    assert record.destination.name == "ratings-v1" and record.destination.principal == RATINGS_ID
    assert (record.destination_service, record.security_policy, record.flags) == (
        RATINGS,
        "unknown",
        "-",
    )


def test_outbound_tcp_without_endpoint() -> None:
    entry = tcp_entry(
        sent=0,
        received=0,
        upstream_cluster=f"outbound|5432||{RATINGS}",
        response_flags=accesslog_pb2.ResponseFlags(no_healthy_upstream=True),
    )
    record = converter().tcp("outbound_tcp", entry).record
    assert (record.flags, record.destination) == ("UH", Workload())


def test_inbound_tcp_denied_by_rbac() -> None:
    entry = tcp_entry(
        sent=0,
        received=0,
        tls_properties=peer_tls(PRODUCTPAGE_ID),
        connection_termination_details="rbac_access_denied_matched_policy[none]",
    )
    record = converter().tcp("inbound_tcp", entry).record
    assert record.reporter == "destination"
    assert record.source.principal == PRODUCTPAGE_ID and record.source.namespace == "default"
    assert (record.security_policy, record.flags) == ("mutual_tls", "RBAC")


def test_periodic_tcp_entries_report_deltas_then_close() -> None:
    conv = converter()
    kw = {"stream_id": "s-1", "tls_properties": peer_tls(PRODUCTPAGE_ID)}
    first = conv.tcp("inbound_tcp", tcp_entry(sent=100, received=10, periodic=True, **kw))
    second = conv.tcp("inbound_tcp", tcp_entry(sent=250, received=10, periodic=True, **kw))
    last = conv.tcp("inbound_tcp", tcp_entry(sent=300, received=30, **kw))
    assert first[1:] == (True, False, 100, 10)
    assert second[1:] == (False, False, 150, 0)
    assert last[1:] == (False, True, 50, 20)
    again = conv.tcp("inbound_tcp", tcp_entry(sent=5, received=5, **kw))
    assert again[1:] == (True, True, 5, 5)  # a closed connection is forgotten


# ---------------------------------------------------------------- ingest -> recorder


def recorder() -> TelemetryRecorder:
    return TelemetryRecorder(
        reporter_id="reviews-v2-abc_00000001",
        namespace="default",
        service="reviews",
        instance="reviews-v2-abc",
    )


def counter(rec: TelemetryRecorder, name: str, **labels: str) -> float:
    return sum(
        v
        for (n, key), v in rec.totals().counters.items()
        if n == name and all(dict(key).get(k) == want for k, want in labels.items())
    )


def test_ingest_records_each_entry_once_with_istio_labels() -> None:
    rec = recorder()
    ingest = AccessLogIngest(converter(), rec)
    ok = http_entry(
        upstream_cluster=f"outbound|0|v1|{RATINGS}",
        upstream_remote_address=address("10.0.0.5", 15006),
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
    )
    failed = http_entry(
        status=503,
        upstream_cluster=f"outbound|0|v1|{RATINGS}",
        response_flags=accesslog_pb2.ResponseFlags(no_healthy_upstream=True),
    )
    first = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(log_name="outbound")
    )
    first.http_logs.log_entry.extend([ok, failed])
    later = als_pb2.StreamAccessLogsMessage()  # Envoy names a stream only once
    later.http_logs.log_entry.extend([ok, ok])
    name = ingest.on_message("", first)
    assert ingest.on_message(name, later) == "outbound"
    assert (ingest.counts.http, ingest.counts.failed) == (4, 0)

    assert counter(rec, wire.REQUESTS_TOTAL) == 4
    labels = {
        "reporter": "source",
        "source_workload": "reviews-v2",
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/reviews",
        "source_app": "reviews",
        "source_version": "v2",
        "destination_workload": "ratings-v1",
        "destination_workload_namespace": "default",
        "destination_principal": RATINGS_ID,
        "destination_service": RATINGS,
        "destination_service_name": "ratings",
        "destination_service_namespace": "default",
        "destination_app": "ratings",
        "destination_version": "v1",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }
    assert counter(rec, wire.REQUESTS_TOTAL, **labels) == 3
    assert counter(rec, wire.REQUESTS_TOTAL, response_code="503", response_flags="UH") == 1
    kinds = {out.kind: out for out in rec.outgoing()}
    access = wire.decode(kinds["access"].payload)
    assert isinstance(access, wire.AccessBatch) and len(access.records) == 4
    assert access.records[0].time_ns == START_NS and access.records[1].response_flags == "UH"
    spans = wire.decode(kinds["spans"].payload)
    assert isinstance(spans, wire.SpanBatch) and len(spans.spans) == 3


def test_ingest_leaves_spans_to_envoys_tracer_when_told() -> None:
    """With Envoy's tracer on, its OTLP export gives the spans: the access logs of
    sampled requests give counts and access records but no second span per hop."""
    rec = recorder()
    ingest = AccessLogIngest(converter(), rec, spans=False)
    message = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(log_name="outbound")
    )
    message.http_logs.log_entry.append(
        http_entry(
            upstream_cluster=f"outbound|0|v1|{RATINGS}",
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        )
    )
    ingest.on_message("", message)
    assert counter(rec, wire.REQUESTS_TOTAL) == 1
    kinds = {out.kind for out in rec.outgoing()}
    assert "access" in kinds and "spans" not in kinds


def test_ingest_counts_an_entry_it_cannot_convert_and_goes_on() -> None:
    rec = recorder()
    ingest = AccessLogIngest(converter(), rec)
    message = als_pb2.StreamAccessLogsMessage()  # no identifier: log name unknown
    message.http_logs.log_entry.append(http_entry())
    ingest.on_message("", message)
    assert (ingest.counts.http, ingest.counts.failed) == (0, 1)
    named = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(log_name="outbound")
    )
    named.http_logs.log_entry.append(http_entry())
    ingest.on_message("", named)
    assert counter(rec, wire.REQUESTS_TOTAL) == 1


def test_ingest_tcp_counts_connections_and_bytes() -> None:
    rec = recorder()
    ingest = AccessLogIngest(converter(), rec)
    message = als_pb2.StreamAccessLogsMessage(
        identifier=als_pb2.StreamAccessLogsMessage.Identifier(log_name="inbound_tcp")
    )
    kw = {"stream_id": "c-1", "tls_properties": peer_tls(PRODUCTPAGE_ID)}
    message.tcp_logs.log_entry.extend(
        [
            tcp_entry(sent=100, received=10, periodic=True, **kw),
            tcp_entry(sent=300, received=30, **kw),
            tcp_entry(sent=1, received=2, stream_id="c-2"),
        ]
    )
    ingest.on_message("", message)
    assert counter(rec, wire.TCP_OPENED) == 2
    assert counter(rec, wire.TCP_CLOSED) == 2
    assert counter(rec, wire.TCP_SENT_BYTES, connection_security_policy="mutual_tls") == 300
    assert counter(rec, wire.TCP_RECEIVED_BYTES) == 32


def test_caller_metadata_from_dynamic_metadata_wins_over_a_logged_header() -> None:
    """`peer_metadata_filter` moves the header into metadata (the app must not get it);
    a logged header is only the fallback."""
    entry = http_entry(
        authority="reviews",
        tls_properties=peer_tls(PRODUCTPAGE_ID),
        headers={"x-meshwork-peer": "workload=stale-v0"},
    )
    meta = struct_pb2.Struct()
    meta.update({"peer": "workload=productpage-v1;app=productpage;version=v1"})
    entry.common_properties.metadata.filter_metadata["meshwork"].CopyFrom(meta)
    record, _ = converter().http("inbound", entry)
    assert (record.source.name, record.source.version) == ("productpage-v1", "v1")


def test_peer_metadata_filter_is_a_valid_header_to_metadata_config() -> None:
    body = dict(peer_metadata_filter()["typedConfig"])
    assert body.pop("@type").endswith("header_to_metadata.v3.Config")
    config = json_format.ParseDict(body, header_to_metadata_pb2.Config())
    rule = config.request_rules[0]
    assert (rule.header, rule.remove) == ("x-meshwork-peer", True)
    assert (rule.on_header_present.metadata_namespace, rule.on_header_present.key) == (
        "meshwork",
        "peer",
    )


def test_inbound_tcp_names_the_caller_from_the_registry() -> None:
    # TCP carries no peer metadata header: the registry's instance holding the
    # certificate's identity names the workload (it used to be "unknown")
    entry = tcp_entry(
        sent=5,
        received=5,
        tls_properties=peer_tls(RATINGS_ID),
        downstream_remote_address=address("10.0.0.5", 40000),
    )
    record = converter().tcp("inbound_tcp", entry).record
    assert (record.source.name, record.source.app, record.source.version) == (
        "ratings-v1",
        "ratings",
        "v1",
    )
    assert record.source.principal == RATINGS_ID and record.source.namespace == "default"
    # a caller the registry does not know stays unknown
    unknown = converter().tcp(
        "inbound_tcp", tcp_entry(sent=1, received=1, tls_properties=peer_tls(PRODUCTPAGE_ID))
    )
    assert unknown.record.source.name == "unknown"
