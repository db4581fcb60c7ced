"""gRPC ext_authz (`envoyExtAuthzGrpc`): the MeshConfig model and its refusals, and
the pure core (`proxy.policy.ext_authz_grpc`): the CheckRequest sent, the framing,
and what a CheckResponse or a failed call decides."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf.wrappers_pb2 import BoolValue

from mesh.compiled import AuthzPolicy, ExtAuthzProvider
from mesh.hosts import ServiceRef
from mesh.resources import ResourceError, parse_resource
from proxy.policy import ext_authz_grpc as core
from services.config.compile_security import compile_inbound_policy

GRPC = {"service": "ext-authz.foo.svc.cluster.local", "port": "9000", "timeout": "250ms"}


def mesh_config(**grpc: Any) -> Any:
    return parse_resource(
        {
            "apiVersion": "meshwork.io/v1",
            "kind": "MeshConfig",
            "metadata": {"name": "mesh", "namespace": "istio-system"},
            "spec": {
                "extensionProviders": [
                    {"name": "sample-ext-authz-grpc", "envoyExtAuthzGrpc": {**GRPC, **grpc}}
                ]
            },
        },
        source="t.yaml",
        index=0,
    )


CUSTOM = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "ext-authz", "namespace": "foo"},
    "spec": {
        "selector": {"matchLabels": {"app": "httpbin"}},
        "action": "CUSTOM",
        "provider": {"name": "sample-ext-authz-grpc"},
        "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}],
    },
}


def test_grpc_provider_compiles_with_its_body_settings() -> None:
    config = mesh_config(
        failOpen=True,
        statusOnError="503",
        includeRequestBodyInCheck={"maxRequestBytes": 100, "packAsBytes": True},
    )
    custom = parse_resource(CUSTOM, source="t.yaml", index=1)
    policy = compile_inbound_policy(
        [config, custom], ServiceRef("foo", "httpbin"), 1, "istio-system"
    )
    (provider,) = policy.extension_providers
    assert provider.protocol == "grpc" and provider.port == 9000
    assert provider.timeout_ms == 250 and provider.fail_open
    assert provider.status_on_error == 503
    assert (provider.max_request_bytes, provider.pack_as_bytes) == (100, True)


REFUSED = [
    ({"port": "grpc"}, "spec.extensionProviders[0].envoyExtAuthzGrpc.port"),
    ({"service": ""}, "spec.extensionProviders[0].envoyExtAuthzGrpc.service"),
    ({"timeout": "0s"}, "spec.extensionProviders[0].envoyExtAuthzGrpc.timeout"),
    ({"statusOnError": "700"}, "spec.extensionProviders[0].envoyExtAuthzGrpc.statusOnError"),
    ({"includeRequestBodyInCheck": {}},
     "spec.extensionProviders[0].envoyExtAuthzGrpc.includeRequestBodyInCheck.maxRequestBytes"),
    ({"includeRequestBodyInCheck": {"maxRequestBytes": 0}},
     "spec.extensionProviders[0].envoyExtAuthzGrpc.includeRequestBodyInCheck.maxRequestBytes"),
    ({"clearRouteCache": True}, "spec.extensionProviders[0].envoyExtAuthzGrpc.clearRouteCache"),
]  # fmt: skip


@pytest.mark.parametrize(("patch", "path"), REFUSED)
def test_grpc_provider_refusals_name_the_field(patch: dict[str, Any], path: str) -> None:
    with pytest.raises(ResourceError) as info:
        mesh_config(**patch)
    assert info.value.path == path


PROVIDER = ExtAuthzProvider(
    name="p", service="ext-authz.foo", port=9000, timeout_ms=250, protocol="grpc"
)


def facts(**changes: Any) -> core.CheckFacts:
    base = core.CheckFacts(
        method="POST",
        path="/headers?x=1",
        host="httpbin.foo:8000",
        scheme="http",
        protocol="HTTP/1.1",
        headers=[
            ("x-ext-authz", "allow"),
            ("cookie", "a"),
            ("cookie", "b"),
            ("x-request-id", "r1"),
        ],
        source=("10.0.0.1", 5555),
        source_principal="spiffe://cluster.local/ns/foo/sa/sleep",
        destination=("10.0.0.2", 8000),
        destination_principal="spiffe://cluster.local/ns/foo/sa/httpbin",
        body=b"payload",
        body_size=7,
    )
    return base._replace(**changes)


def test_check_request_carries_what_envoy_sends() -> None:
    sent = external_auth_pb2.CheckRequest.FromString(core.check_request(PROVIDER, facts()))
    a = sent.attributes
    assert a.source.principal.endswith("/sa/sleep")
    assert a.source.address.socket_address.address == "10.0.0.1"
    assert a.destination.address.socket_address.port_value == 8000
    http = a.request.http
    assert (http.method, http.path, http.host, http.id) == (
        "POST",
        "/headers?x=1",
        "httpbin.foo:8000",
        "r1",
    )
    # repeated headers joined as Envoy joins them
    assert http.headers["cookie"] == "a,b"
    # the body only when the provider includes it
    assert http.body == "" and http.raw_body == b""
    with_body = PROVIDER.__class__(**{**_fields(PROVIDER), "max_request_bytes": 16})
    http = external_auth_pb2.CheckRequest.FromString(
        core.check_request(with_body, facts())
    ).attributes.request.http
    assert http.body == "payload" and http.size == 7
    packed = PROVIDER.__class__(
        **{**_fields(PROVIDER), "max_request_bytes": 16, "pack_as_bytes": True}
    )
    http = external_auth_pb2.CheckRequest.FromString(
        core.check_request(packed, facts(partial_body=True))
    ).attributes.request.http
    assert http.raw_body == b"payload" and http.headers["x-envoy-auth-partial-body"] == "true"


def _fields(p: ExtAuthzProvider) -> dict[str, Any]:
    return {f: getattr(p, f) for f in p.__struct_fields__}


def _option(name: str, value: str, append: bool | None = None) -> base_pb2.HeaderValueOption:
    option = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=name, value=value))
    if append is not None:
        option.append.CopyFrom(BoolValue(value=append))
    return option


def test_ok_response_sets_appends_and_removes_headers_but_never_host() -> None:
    answer = external_auth_pb2.CheckResponse(
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                _option("X-User", "jason"),
                _option("x-tag", "b", True),
                _option("host", "evil"),
            ],
            headers_to_remove=["x-drop", ":path", "host"],
            response_headers_to_add=[_option("X-Note", "hi"), _option("content-length", "9")],
        )
    )
    checked = core.check_response(PROVIDER, answer.SerializeToString())
    assert checked.result.allowed
    assert checked.result.downstream_headers == (("x-note", "hi"),)
    headers = [("host", "h"), ("x-user", "spoofed"), ("x-tag", "a"), ("x-drop", "1")]
    assert core.with_grpc_headers(headers, checked) == [
        ("host", "h"),
        ("x-tag", "a"),
        ("x-user", "jason"),
        ("x-tag", "b"),
    ]


def test_denied_response_status_headers_and_body() -> None:
    answer = external_auth_pb2.CheckResponse()
    answer.status.code = 7  # PERMISSION_DENIED
    answer.denied_response.headers.append(_option("x-ext-authz-check-result", "denied"))
    answer.denied_response.body = "no"
    result = core.check_response(PROVIDER, answer.SerializeToString()).result
    # no status in the denial: Envoy's 403
    assert (result.allowed, result.status, result.body) == (False, 403, b"no")
    assert result.downstream_headers == (("x-ext-authz-check-result", "denied"),)
    answer.denied_response.status.code = 401
    assert core.check_response(PROVIDER, answer.SerializeToString()).result.status == 401


def test_framing_and_failed_calls() -> None:
    message = b"abc"
    assert core.unframe(core.frame(message)) == message
    for broken in (b"", b"\x00\x00\x00\x00\x09abc", b"\x01\x00\x00\x00\x03abc"):
        with pytest.raises(core.GrpcCallError):
            core.unframe(broken)
    core.call_status(200, [], [("grpc-status", "0")])
    core.call_status(200, [("grpc-status", "0")], None)  # trailers-only
    with pytest.raises(core.GrpcCallError, match="grpc-status 14 down"):
        core.call_status(200, [], [("grpc-status", "14"), ("grpc-message", "down")])
    with pytest.raises(core.GrpcCallError, match="HTTP status 503"):
        core.call_status(503, [], None)
    with pytest.raises(core.GrpcCallError, match="no grpc-status"):
        core.call_status(200, [], [])
    with pytest.raises(core.GrpcCallError, match="undecodable"):
        core.check_response(PROVIDER, b"\xff\xff")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_envoy_filter_carries_the_body_settings(protocol: str) -> None:
    from proxy.envoy.translate.ext_authz import ext_authz_filters

    provider = ExtAuthzProvider(
        name="p", service="ext-authz.foo", port=9000, protocol=protocol,  # type: ignore[arg-type]
        max_request_bytes=64, allow_partial_message=True,
    )  # fmt: skip
    custom = AuthzPolicy(name="c", namespace="foo", action="CUSTOM", provider="p")
    _shadow, ext_authz = ext_authz_filters([custom], provider, "foo", {})
    body = ext_authz["typedConfig"]
    assert body["withRequestBody"] == {
        "maxRequestBytes": 64,
        "allowPartialMessage": True,
        "packAsBytes": False,
    }
    assert ("grpcService" in body) is (protocol == "grpc")
