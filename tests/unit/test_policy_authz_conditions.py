"""The `when` keys of the connection (Istio's "Authorization Policy Conditions"):
`remote.ip`, `destination.ip` and `connection.sni`, on requests and TCP connections,
and the SNI the inbound TLS context records for them."""

from __future__ import annotations

import ssl
from typing import Literal

import pytest

from mesh import identity
from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy
from mesh.resources import ResourceError, parse_resource
from proxy.policy import Authorizer, ConnectionFacts, RequestFacts
from tests.unit.test_identity import RATINGS, REVIEWS, contexts, make_root


def authorizer(
    key: str, values: tuple[str, ...], not_values: tuple[str, ...], action: str
) -> Authorizer:
    rule = AuthzRule(when=(Condition(key=key, values=values, not_values=not_values),))
    policy = AuthzPolicy(name="p", namespace="foo", action=action, rules=(rule,))  # type: ignore[arg-type]
    return Authorizer.build(
        InboundPolicy(namespace="foo", service="httpbin", revision=1, authorization=(policy,)), {}
    )


def request(destination_ip: str = "10.0.0.9", sni: str = "", remote_ip: str = "") -> RequestFacts:
    return RequestFacts(
        "", "", "10.0.0.5", "GET", "/", "httpbin", 8000, {},
        remote_ip=remote_ip, destination_ip=destination_ip, sni=sni,
    )  # fmt: skip


Action = Literal["ALLOW", "DENY"]
# (key, values, notValues, action, facts) -> allowed
MATRIX: list[tuple[str, tuple[str, ...], tuple[str, ...], Action, RequestFacts, bool]] = [
    ("destination.ip", ("10.0.0.0/24",), (), "ALLOW", request(), True),
    ("destination.ip", ("10.0.0.8",), (), "ALLOW", request(), False),
    ("destination.ip", (), ("10.0.0.9",), "ALLOW", request(), False),
    ("destination.ip", ("10.0.0.0/8",), (), "DENY", request(), False),
    ("destination.ip", ("fd00::/8",), (), "DENY", request(), True),
    # remote.ip: the original client (X-Forwarded-For past trusted hops), else the peer
    ("remote.ip", ("192.0.2.7",), (), "ALLOW", request(remote_ip="192.0.2.7"), True),
    ("remote.ip", ("10.0.0.5",), (), "ALLOW", request(remote_ip="192.0.2.7"), False),
    ("remote.ip", ("10.0.0.5",), (), "ALLOW", request(), True),
    ("connection.sni", ("*.example.com",), (), "ALLOW", request(sni="a.example.com"), True),
    ("connection.sni", ("a.example.com",), (), "ALLOW", request(sni="b.example.com"), False),
    # no SNI sent: no value matches, no notValue excludes
    ("connection.sni", ("*",), (), "ALLOW", request(), False),
    ("connection.sni", (), ("a.example.com",), "DENY", request(), False),
    ("connection.sni", (), ("a.example.com",), "DENY", request(sni="a.example.com"), True),
]  # fmt: skip


@pytest.mark.parametrize(("key", "values", "not_values", "action", "facts", "allowed"), MATRIX)
def test_connection_conditions_on_requests(
    key: str,
    values: tuple[str, ...],
    not_values: tuple[str, ...],
    action: Action,
    facts: RequestFacts,
    allowed: bool,
) -> None:
    assert authorizer(key, values, not_values, action).decide(facts).allowed is allowed


def test_connection_conditions_on_tcp_connections() -> None:
    conn = ConnectionFacts(
        "", "", "10.0.0.5", 9000, destination_ip="10.0.0.9", sni="db.example.com"
    )
    assert authorizer("destination.ip", ("10.0.0.9",), (), "ALLOW").decide_connection(conn).allowed
    assert (
        not authorizer("destination.ip", ("10.1.0.0/16",), (), "ALLOW")
        .decide_connection(conn)
        .allowed
    )
    assert not authorizer("connection.sni", ("db.*",), (), "DENY").decide_connection(conn).allowed
    assert authorizer("remote.ip", ("10.0.0.5",), (), "ALLOW").decide_connection(conn).allowed


@pytest.mark.parametrize(
    ("key", "value"),
    [("destination.ip", "10.0.0.300"), ("remote.ip", "not-an-ip")],
)
def test_address_keys_refuse_what_is_not_an_address(key: str, value: str) -> None:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "foo"},
        "spec": {"rules": [{"when": [{"key": key, "values": [value]}]}]},
    }
    with pytest.raises(ResourceError) as info:
        parse_resource(body, source="t.yaml", index=0)
    assert info.value.path == "spec.rules[0].when[0].values[0]"


def test_source_trust_domain_is_not_a_condition() -> None:
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "foo"},
        "spec": {"rules": [{"when": [{"key": "source.trustDomain", "values": ["td"]}]}]},
    }
    with pytest.raises(ResourceError, match=r"connection\.sni"):
        parse_resource(body, source="t.yaml", index=0)


def _handshake(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, sni: str | None
) -> ssl.SSLObject:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=sni)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (client, server):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    return server


def test_the_inbound_context_records_the_sni_the_client_sent() -> None:
    root = make_root()
    server_ctx, _ = contexts(root, REVIEWS, [root.cert])
    _, client_ctx = contexts(root, RATINGS, [root.cert])
    front = identity.switching_server_context(lambda: server_ctx)
    server = _handshake(client_ctx, front, "reviews.example.com")
    assert identity.requested_server_name(server) == "reviews.example.com"
    assert identity.requested_server_name(_handshake(client_ctx, front, None)) == ""
    assert identity.requested_server_name(None) == ""
