"""PeerAuthentication and AuthorizationPolicy: what `meshctl apply` accepts, and what it
refuses (by path) rather than silently enforcing less than the user wrote."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from mesh.resources import (
    KINDS,
    AuthorizationPolicySpec,
    PeerAuthenticationSpec,
    Resource,
    ResourceError,
    load_yaml,
    parse_resource,
    resolve_kind,
    to_dict,
)

# Examples from Istio's reference pages (security.istio.io PeerAuthentication and
# AuthorizationPolicy) and tasks, as published.
ISTIO_PEER_AUTHENTICATIONS = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  mtls:
    mode: PERMISSIVE
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  portLevelMtls:
    8080:
      mode: DISABLE
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: "default"
  namespace: "istio-system"
spec:
  mtls:
    mode: STRICT
"""

ISTIO_AUTHORIZATION_POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["foo"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: foo
spec:
  rules:
  - {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: foo
spec:
  {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.headers[version]
      values: ["v1", "v2"]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: "productpage-viewer"
  namespace: default
spec:
  selector:
    matchLabels:
      app: productpage
  action: ALLOW
  rules:
  - to:
    - operation:
        methods: ["GET"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin-audit
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: AUDIT
  rules:
  - to:
    - operation:
        paths: ["/headers"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ingress-policy
  namespace: istio-system
spec:
  selector:
    matchLabels:
      app: istio-ingressgateway
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["1.2.3.4", "5.6.7.0/24"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: tcp-policy
  namespace: foo
spec:
  selector:
    matchLabels:
      app: tcp-echo
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["9000", "9001"]
  - from:
    - source:
        notPrincipals: ["*"]
    when:
    - key: destination.port
      notValues: ["9002"]
    - key: source.ip
      values: ["10.0.0.0/8", "fd00::/8"]
    - key: source.namespace
      values: ["prod-*"]
    - key: source.principal
      notValues: ["*/sa/legacy"]
"""


def parse_all(text: str) -> list[Resource]:
    return [
        parse_resource(body, source="istio.yaml", index=i)
        for i, body in enumerate(load_yaml(text, "istio.yaml"))
    ]


def pa(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "p", "namespace": "foo"},
        "spec": spec,
    }


def ap(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "a", "namespace": "foo"},
        "spec": spec,
    }


def rejection(body: dict[str, Any], index: int = 0) -> ResourceError:
    with pytest.raises(ResourceError) as info:
        parse_resource(copy.deepcopy(body), source="t.yaml", index=index)
    return info.value


def src(**source: Any) -> dict[str, Any]:
    """An ALLOW policy with one rule whose only `from` has this source."""
    return ap(rules=[{"from": [{"source": source}]}])


def op(**operation: Any) -> dict[str, Any]:
    return ap(rules=[{"to": [{"operation": operation}]}])


def when(**condition: Any) -> dict[str, Any]:
    return ap(rules=[{"when": [condition]}])


# ---------------------------------------------------------------- accepted


@pytest.mark.parametrize("text", [ISTIO_PEER_AUTHENTICATIONS, ISTIO_AUTHORIZATION_POLICIES])
def test_istio_examples_parse_and_give_back_what_was_applied(text: str) -> None:
    bodies = load_yaml(text, "istio.yaml")
    resources = parse_all(text)
    assert len(resources) == len(bodies)
    for body, resource in zip(bodies, resources, strict=True):
        # what `meshctl get -o yaml` shows is what was applied (JSON-shaped: map keys
        # such as port numbers become strings)
        assert to_dict(resource) == json.loads(json.dumps(body))
        assert parse_resource(to_dict(resource), source="etcd", index=0) == resource


def test_peer_authentication_typed_fields() -> None:
    namespace_wide, _workload, with_ports, ports_only, mesh = parse_all(ISTIO_PEER_AUTHENTICATIONS)
    assert isinstance(namespace_wide.spec, PeerAuthenticationSpec)
    assert namespace_wide.spec.mtls is not None and namespace_wide.spec.mtls.mode == "PERMISSIVE"
    assert namespace_wide.spec.selector is None
    assert isinstance(with_ports.spec, PeerAuthenticationSpec)
    assert with_ports.spec.selector is not None
    assert with_ports.spec.selector.match_labels == {"app": "finance"}
    assert {p: m.mode for p, m in (with_ports.spec.port_level_mtls or {}).items()} == {
        8080: "DISABLE"
    }
    assert isinstance(ports_only.spec, PeerAuthenticationSpec) and ports_only.spec.mtls is None
    assert (mesh.api_version, mesh.metadata.namespace) == (
        "security.istio.io/v1beta1",
        "istio-system",
    )


def test_port_level_mtls_keys_from_json_are_the_same_ports() -> None:
    """Stored resources (JSON) have string keys; they must parse to the same resource."""
    from_yaml = parse_resource(
        pa(selector={"matchLabels": {"app": "a"}}, portLevelMtls={8080: {"mode": "STRICT"}}),
        source="t.yaml",
        index=0,
    )
    from_json = parse_resource(
        pa(selector={"matchLabels": {"app": "a"}}, portLevelMtls={"8080": {"mode": "STRICT"}}),
        source="t.yaml",
        index=0,
    )
    assert from_yaml == from_json


def test_authorization_policy_typed_fields() -> None:
    resources = parse_all(ISTIO_AUTHORIZATION_POLICIES)
    first = resources[0].spec
    assert isinstance(first, AuthorizationPolicySpec)
    rule = first.rules[0]
    assert rule.from_ is not None and rule.to is not None
    assert [f.source.principals for f in rule.from_ if f.source] == [
        ("cluster.local/ns/default/sa/sleep",),
        (),
    ]
    assert [t.operation.paths for t in rule.to if t.operation] == [("/info*",), ("/data",)]
    deny_all = resources[3].spec
    assert isinstance(deny_all, AuthorizationPolicySpec)
    assert (deny_all.action, deny_all.rules) == (None, ())
    allow_all = resources[2].spec
    assert isinstance(allow_all, AuthorizationPolicySpec)
    assert len(allow_all.rules) == 1 and allow_all.rules[0].from_ is None


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
@pytest.mark.parametrize("kind", ["PeerAuthentication", "AuthorizationPolicy"])
def test_security_versions_are_accepted(kind: str, version: str) -> None:
    body = {**(pa() if kind == "PeerAuthentication" else ap()), "kind": kind}
    body["apiVersion"] = f"security.istio.io/{version}"
    assert parse_resource(body, source="t.yaml", index=0).kind == kind


def test_security_kinds_refuse_networking_api_version() -> None:
    body = pa()
    body["apiVersion"] = "networking.istio.io/v1"
    error = rejection(body)
    assert error.path == "apiVersion"
    assert error.message == (
        "apiVersion networking.istio.io/v1 is not supported for kind PeerAuthentication "
        "(use security.istio.io/v1 or security.istio.io/v1beta1)"
    )


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("pa", "PeerAuthentication"),
        ("PA", "PeerAuthentication"),
        ("peerauthentication", "PeerAuthentication"),
        ("peerauthentications", "PeerAuthentication"),
        ("peerauthentications.security.istio.io", "PeerAuthentication"),
        ("ap", "AuthorizationPolicy"),
        ("authorizationpolicy", "AuthorizationPolicy"),
        ("AuthorizationPolicies", "AuthorizationPolicy"),
        ("authorizationpolicies.security.istio.io", "AuthorizationPolicy"),
    ],
)
def test_meshctl_get_aliases_resolve(name: str, kind: str) -> None:
    assert resolve_kind(name) == kind


def test_kind_registry_entries() -> None:
    assert (KINDS["PeerAuthentication"].plural, KINDS["PeerAuthentication"].short_names) == (
        "peerauthentications",
        ("pa",),
    )
    assert KINDS["AuthorizationPolicy"].api_versions == (
        "security.istio.io/v1",
        "security.istio.io/v1beta1",
    )


@pytest.mark.parametrize(
    "body",
    [
        src(principals=["*"]),
        src(principals=["cluster.local/ns/*"]),
        src(principals=["*/sa/sleep"]),
        src(ipBlocks=["::1", "2001:db8::/32", "10.1.2.3/16"]),
        op(paths=["*"], hosts=["*.example.com", "example.*"], methods=["GET", "P*"]),
        op(notPorts=["1", "65535"]),
        when(key="request.headers[x-token]", notValues=["*"]),
        pa(selector={"matchLabels": {}}),  # empty labels: no selector, as in Istio
        pa(mtls={}),
        pa(selector={"matchLabels": {"app": "a"}}, portLevelMtls={1: {}, 65535: {"mode": "UNSET"}}),
        ap(action="AUDIT"),
    ],
)
def test_valid_edge_values_are_accepted(body: dict[str, Any]) -> None:
    parse_resource(body, source="t.yaml", index=0)


# ---------------------------------------------------------------- refused


UNSUPPORTED = [
    (ap(rules=[{"to": [{"operation": {"methods": ["GET"], "verbs": ["x"]}}]}]), "spec.rules[0].to[0].operation.verbs"),
    (ap(rules=[{"when": [{"key": "source.ip", "values": ["1.2.3.4"], "ignore": True}]}]), "spec.rules[0].when[0].ignore"),
    (ap(rules=[{"from": [{"source": {"namespaces": ["a"]}, "extra": 1}]}]), "spec.rules[0].from[0].extra"),
    (ap(rules=[{"from": [{"source": {"namespaces": ["a"]}}], "unless": []}]), "spec.rules[0].unless"),
    (ap(selector={"matchLabels": {"app": "a"}, "matchExpressions": []}), "spec.selector.matchExpressions"),
    (pa(mtls={"mode": "STRICT", "tls": True}), "spec.mtls.tls"),
    (pa(selector={"matchLabels": {"a": "b"}}, portLevelMtls={80: {"mode": "STRICT", "x": 1}}), "spec.portLevelMtls.80.x"),
    (pa(targetRef={"kind": "Service", "name": "s"}), "spec.targetRef"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "path"), UNSUPPORTED)
def test_unsupported_field_is_refused_with_its_path(body: dict[str, Any], path: str) -> None:
    error = rejection(body, index=2)
    assert error.path == path
    assert error.message == f"{path} is not supported"
    assert str(error) == f"t.yaml: document 2: {path} is not supported"


PATTERN = (
    "must be an exact value, '*', a prefix ('abc*') or a suffix ('*abc'): '*' is only allowed "
    "at the start or the end, got "
)
SUPPORTED_KEYS = (
    "request.headers[<name>], request.auth.claims[<name>], source.principal, source.namespace, "
    "source.ip, remote.ip, destination.ip, destination.port, connection.sni, "
    "request.auth.principal, request.auth.audiences, request.auth.presenter"
)

REFUSED = [
    # AuthorizationPolicy: action
    (ap(action="CUSTOM"), "spec.provider.name", "spec.provider.name is required with action CUSTOM (an extension provider of the mesh's MeshConfig)"),
    (ap(action="allow"), "spec.action", "must be one of ALLOW, DENY, AUDIT or CUSTOM, got 'allow'"),
    (ap(action="DENY"), "spec.rules", "a DENY policy without rules never applies; add an empty rule {} to deny every request"),
    # empty from / to / source / operation
    (ap(rules=[{"from": []}]), "spec.rules[0].from", "must not be empty (omit it to match any source)"),
    (ap(rules=[{"to": []}]), "spec.rules[0].to", "must not be empty (omit it to match any operation)"),
    (ap(rules=[{"from": [{}]}]), "spec.rules[0].from[0].source", "spec.rules[0].from[0].source is required"),
    (ap(rules=[{"to": [{}]}]), "spec.rules[0].to[0].operation", "spec.rules[0].to[0].operation is required"),
    (src(), "spec.rules[0].from[0].source", "must set at least one of principals, notPrincipals, requestPrincipals, notRequestPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks, serviceAccounts, notServiceAccounts, remoteIpBlocks or notRemoteIpBlocks"),
    (src(principals=[]), "spec.rules[0].from[0].source", "must set at least one of principals, notPrincipals, requestPrincipals, notRequestPrincipals, namespaces, notNamespaces, ipBlocks, notIpBlocks, serviceAccounts, notServiceAccounts, remoteIpBlocks or notRemoteIpBlocks"),
    (op(), "spec.rules[0].to[0].operation", "must set at least one of methods, notMethods, paths, notPaths, hosts, notHosts, ports or notPorts"),
    # patterns
    (src(principals=["cluster.local/*/sa/sleep"]), "spec.rules[0].from[0].source.principals[0]", PATTERN + "'cluster.local/*/sa/sleep'"),
    (src(notNamespaces=["ok", "*a*"]), "spec.rules[0].from[0].source.notNamespaces[1]", PATTERN + "'*a*'"),
    (src(namespaces=[""]), "spec.rules[0].from[0].source.namespaces[0]", "must not be empty"),
    (op(hosts=["**"]), "spec.rules[0].to[0].operation.hosts[0]", PATTERN + "'**'"),
    (op(notMethods=["G*T"]), "spec.rules[0].to[0].operation.notMethods[0]", PATTERN + "'G*T'"),
    (op(paths=["/api/{*}x/info"]), "spec.rules[0].to[0].operation.paths[0]", "must be a path template: start with '/', use {*} and {**} as whole segments, {**} as the last operator, and no other '*', '{' or '}', got '/api/{*}x/info'"),
    (op(paths=["/a/{**}/{*}"]), "spec.rules[0].to[0].operation.paths[0]", "must be a path template: start with '/', use {*} and {**} as whole segments, {**} as the last operator, and no other '*', '{' or '}', got '/a/{**}/{*}'"),
    (op(paths=["/a b/{*}"]), "spec.rules[0].to[0].operation.paths[0]", "must use only letters, digits and -._~%!$&'()+,;:@= in the segments of a path template, got '/a b/{*}'"),
    (op(notPaths=["/*/b/{*}"]), "spec.rules[0].to[0].operation.notPaths[0]", "must be a path template: start with '/', use {*} and {**} as whole segments, {**} as the last operator, and no other '*', '{' or '}', got '/*/b/{*}'"),
    (src(remoteIpBlocks=["10.0.0.0/33"]), "spec.rules[0].from[0].source.remoteIpBlocks[0]", "must be an IP address or a CIDR range (e.g. 10.1.0.0/16), got '10.0.0.0/33'"),
    (src(serviceAccounts=["sleep"]), "spec.rules[0].from[0].source.serviceAccounts[0]", "must be <namespace>/<service account> without wildcards (e.g. 'default/sleep'), got 'sleep'"),
    (src(notServiceAccounts=["default/*"]), "spec.rules[0].from[0].source.notServiceAccounts[0]", "must be <namespace>/<service account> without wildcards (e.g. 'default/sleep'), got 'default/*'"),
    (op(notPaths=["/a*b"]), "spec.rules[0].to[0].operation.notPaths[0]", PATTERN + "'/a*b'"),
    # IPs and ports
    (src(ipBlocks=["10.0.0.0/33"]), "spec.rules[0].from[0].source.ipBlocks[0]", "must be an IP address or a CIDR range (e.g. 10.1.0.0/16), got '10.0.0.0/33'"),
    (src(notIpBlocks=["1.2.3.4", "example.com"]), "spec.rules[0].from[0].source.notIpBlocks[1]", "must be an IP address or a CIDR range (e.g. 10.1.0.0/16), got 'example.com'"),
    (src(ipBlocks=["10.0.0.0/255.0.0.0"]), "spec.rules[0].from[0].source.ipBlocks[0]", "must be an IP address or a CIDR range (e.g. 10.1.0.0/16), got '10.0.0.0/255.0.0.0'"),
    (op(ports=["0"]), "spec.rules[0].to[0].operation.ports[0]", "must be a port number between 1 and 65535 (as a string), got '0'"),
    (op(notPorts=["80", "65536"]), "spec.rules[0].to[0].operation.notPorts[1]", "must be a port number between 1 and 65535 (as a string), got '65536'"),
    (op(ports=["http"]), "spec.rules[0].to[0].operation.ports[0]", "must be a port number between 1 and 65535 (as a string), got 'http'"),
    (op(ports=[8080]), "spec.rules[0].to[0].operation.ports[0]", "must be a string, got an integer"),
    # when
    (when(key="experimental.envoy.filters.network.mysql_proxy[db.table]", values=["x"]), "spec.rules[0].when[0].key", f"spec.rules[0].when[0].key 'experimental.envoy.filters.network.mysql_proxy[db.table]' is not supported (supported keys: {SUPPORTED_KEYS})"),
    (when(key="request.auth.claims", values=["x"]), "spec.rules[0].when[0].key", "must be request.auth.claims[<name>] (nested: [a][b]), got 'request.auth.claims'"),
    (when(key="request.auth.claims[]", values=["x"]), "spec.rules[0].when[0].key", "must be request.auth.claims[<name>] (nested: [a][b]), got 'request.auth.claims[]'"),
    (when(key="request.method", values=["GET"]), "spec.rules[0].when[0].key", f"spec.rules[0].when[0].key 'request.method' is not supported (supported keys: {SUPPORTED_KEYS})"),
    (when(key="destination.ip", values=["10.0.0.300"]), "spec.rules[0].when[0].values[0]", "must be an IP address or a CIDR range (e.g. 10.1.0.0/16), got '10.0.0.300'"),
    (when(key="", values=["x"]), "spec.rules[0].when[0].key", "must not be empty"),
    (when(key="request.headers", values=["x"]), "spec.rules[0].when[0].key", "must be request.headers[<name>], got 'request.headers'"),
    (when(key="request.headers[]", values=["x"]), "spec.rules[0].when[0].key", "header in 'request.headers[]' must be a valid HTTP header name, got ''"),
    (when(key="request.headers[:authority]", values=["a"]), "spec.rules[0].when[0].key", "header in 'request.headers[:authority]' must be a valid HTTP header name, got ':authority'"),
    (when(key="source.ip"), "spec.rules[0].when[0]", "must set values or notValues"),
    (when(key="source.ip", values=["300.1.1.1"]), "spec.rules[0].when[0].values[0]", "must be an IP address or a CIDR range (e.g. 10.1.0.0/16), got '300.1.1.1'"),
    (when(key="destination.port", notValues=["80", "x"]), "spec.rules[0].when[0].notValues[1]", "must be a port number between 1 and 65535 (as a string), got 'x'"),
    (when(key="source.principal", values=["a*b"]), "spec.rules[0].when[0].values[0]", PATTERN + "'a*b'"),
    (when(key="request.headers[x-user]", values=[""]), "spec.rules[0].when[0].values[0]", "must not be empty"),
    (ap(rules=[{"when": [{"values": ["x"]}]}]), "spec.rules[0].when[0].key", "spec.rules[0].when[0].key is required"),
    # selectors
    (ap(selector={"matchLabels": {"app": "*"}}), "spec.selector.matchLabels.app", "must be a label value (at most 63 letters, digits, '-', '_' or '.'), got '*'"),
    # PeerAuthentication
    (pa(mtls={"mode": "strict"}), "spec.mtls.mode", "must be one of UNSET, STRICT, PERMISSIVE or DISABLE, got 'strict'"),
    (pa(portLevelMtls={8080: {"mode": "DISABLE"}}), "spec.portLevelMtls", "spec.portLevelMtls requires spec.selector with matchLabels (port-level mTLS applies to selected workloads only)"),
    (pa(selector={"matchLabels": {}}, portLevelMtls={8080: {"mode": "DISABLE"}}), "spec.portLevelMtls", "spec.portLevelMtls requires spec.selector with matchLabels (port-level mTLS applies to selected workloads only)"),
    (pa(selector={"matchLabels": {"a": "b"}}, portLevelMtls={}), "spec.portLevelMtls", "must list at least one port"),
    (pa(selector={"matchLabels": {"a": "b"}}, portLevelMtls={0: {"mode": "DISABLE"}}), "spec.portLevelMtls.0", "port must be between 1 and 65535, got 0"),
    (pa(selector={"matchLabels": {"a": "b"}}, portLevelMtls={"http": {"mode": "DISABLE"}}), "spec.portLevelMtls.http", "port must be between 1 and 65535, got 'http'"),
    (pa(selector={"matchLabels": {"a": "b"}}, portLevelMtls={9080: {"mode": "OFF"}}), "spec.portLevelMtls.9080.mode", "must be one of UNSET, STRICT, PERMISSIVE or DISABLE, got 'OFF'"),
    (pa(mtls="STRICT"), "spec.mtls", "must be a mapping, got a string"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "path", "message"), REFUSED)
def test_refusal_names_the_field(body: dict[str, Any], path: str, message: str) -> None:
    error = rejection(body)
    assert (error.path, error.message) == (path, message)
    assert str(error).startswith("t.yaml: document 0: ")
    assert path in str(error)


# ---------------------------------------------------------------- istio.io/dry-run


def dry_run(value: object) -> dict[str, Any]:
    body = ap(rules=[{}], action="DENY")
    body["metadata"]["annotations"] = {"istio.io/dry-run": value}
    return body


@pytest.mark.parametrize("value", ["true", "false"])
def test_dry_run_annotation_values_are_accepted(value: str) -> None:
    resource = parse_resource(dry_run(value), source="t.yaml", index=0)
    assert resource.metadata.annotations == {"istio.io/dry-run": value}
    assert to_dict(resource)["metadata"]["annotations"] == {"istio.io/dry-run": value}


@pytest.mark.parametrize("value", ["True", "yes", "1", "", " true"])
def test_dry_run_annotation_other_values_are_refused(value: str) -> None:
    error = rejection(dry_run(value))
    assert error.path == 'metadata.annotations["istio.io/dry-run"]'
    assert error.message == f"must be 'true' or 'false', got {value!r}"


def test_dry_run_annotation_is_only_checked_on_authorization_policies() -> None:
    body = pa(mtls={"mode": "STRICT"})
    body["metadata"]["annotations"] = {"istio.io/dry-run": "maybe"}
    assert parse_resource(body, source="t.yaml", index=0).kind == "PeerAuthentication"
