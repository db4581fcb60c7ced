"""AuthorizationPolicy on TCP connections and dry-run policies (proxy.policy.authz).

Cases follow Istio's authz-tcp task (tcp-echo on ports 9000 and 9001) and Istio's
`forTCP` generation: an ALLOW rule that names HTTP-only fields never matches a
connection; a DENY rule drops them and denies on what remains.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest

from mesh.compiled import AuthzPolicy, AuthzRule, Condition, InboundPolicy, Operation, Source
from proxy.policy import Authorizer, ConnectionFacts, Decision, RequestFacts, ShadowDecision

LABELS = {"app": "tcp-echo"}
SLEEP = "cluster.local/ns/foo/sa/sleep"
OTHER = "cluster.local/ns/bar/sa/other"


def conn(port: int = 9000, **overrides: Any) -> ConnectionFacts:
    base: dict[str, Any] = {
        "principal": SLEEP,
        "namespace": "foo",
        "source_ip": "10.0.0.5",
        "port": port,
    }
    base.update(overrides)
    return ConnectionFacts(**base)


def policy(
    *rules: AuthzRule,
    action: Literal["ALLOW", "DENY", "AUDIT"] = "ALLOW",
    name: str = "p",
    dry_run: bool = False,
) -> AuthzPolicy:
    return AuthzPolicy(
        name=name, namespace="foo", action=action, selector=dict(LABELS), rules=rules,
        dry_run=dry_run,
    )  # fmt: skip


def authorizer(*policies: AuthzPolicy) -> Authorizer:
    return Authorizer.build(
        InboundPolicy(namespace="foo", service="tcp-echo", revision=1, authorization=policies),
        LABELS,
    )


def to(**fields: Any) -> AuthzRule:
    return AuthzRule(operations=(Operation(**fields),))


PORTS = to(ports=("9000", "9001"))
PORTS_AND_GET = to(methods=("GET",), ports=("9000",))

# (policies, facts, allowed, deciding policy)
TCP_CASES: list[tuple[str, tuple[AuthzPolicy, ...], ConnectionFacts, bool, str]] = [
    ("no policy", (), conn(), True, ""),
    ("allow-nothing (spec {})", (policy(name="allow-nothing"),), conn(), False, ""),
    ("ALLOW ports: 9000 allowed", (policy(PORTS, name="tcp-policy"),), conn(9000), True,
     "foo/tcp-policy"),
    ("ALLOW ports: 9002 not listed", (policy(PORTS, name="tcp-policy"),), conn(9002), False, ""),
    ("ALLOW with methods never matches", (policy(PORTS_AND_GET, name="tcp-policy"),),
     conn(9000), False, ""),
    ("ALLOW with paths never matches", (policy(to(paths=("/x",)), name="a"),), conn(), False, ""),
    ("ALLOW with notHosts never matches", (policy(to(not_hosts=("h",)), name="a"),), conn(),
     False, ""),
    ("ALLOW with a header condition never matches",
     (policy(AuthzRule(when=(Condition(key="request.headers[x-a]", values=("1",)),)),
             name="a"),), conn(), False, ""),
    ("ALLOW: the other rule, without HTTP fields, still matches",
     (policy(to(methods=("GET",)), to(ports=("9001",)), name="a"),), conn(9001), True, "foo/a"),
    ("DENY methods+ports denies on that port",
     (policy(PORTS_AND_GET, action="DENY", name="deny-get"), policy(PORTS, name="allow")),
     conn(9000), False, "foo/deny-get"),
    ("DENY methods+ports leaves the other port",
     (policy(PORTS_AND_GET, action="DENY", name="deny-get"), policy(PORTS, name="allow")),
     conn(9001), True, "foo/allow"),
    ("DENY with only methods denies every connection",
     (policy(to(methods=("GET",)), action="DENY", name="d"),), conn(9001), False, "foo/d"),
    ("DENY header condition is dropped",
     (policy(AuthzRule(sources=(Source(namespaces=("foo",)),),
                       when=(Condition(key="request.headers[x-a]", values=("1",)),)),
             action="DENY", name="d"),), conn(), False, "foo/d"),
    ("DENY header condition dropped, source still applies",
     (policy(AuthzRule(sources=(Source(namespaces=("bar",)),),
                       when=(Condition(key="request.headers[x-a]", values=("1",)),)),
             action="DENY", name="d"),), conn(), True, ""),
    ("ALLOW by principal (mTLS)",
     (policy(AuthzRule(sources=(Source(principals=(SLEEP,)),)), name="a"),), conn(), True,
     "foo/a"),
    ("ALLOW by principal: another caller",
     (policy(AuthzRule(sources=(Source(principals=(SLEEP,)),)), name="a"),),
     conn(principal=OTHER, namespace="bar"), False, ""),
    ("ALLOW by principal: plaintext caller",
     (policy(AuthzRule(sources=(Source(principals=("*",)),)), name="a"),),
     conn(principal="", namespace=""), False, ""),
    ("ALLOW notNamespaces",
     (policy(AuthzRule(sources=(Source(not_namespaces=("bar",)),)), name="a"),),
     conn(principal=OTHER, namespace="bar"), False, ""),
    ("ALLOW ipBlocks",
     (policy(AuthzRule(sources=(Source(ip_blocks=("10.0.0.0/24",)),)), name="a"),),
     conn(source_ip="10.0.0.7"), True, "foo/a"),
    ("ALLOW ipBlocks: outside", (policy(AuthzRule(sources=(Source(ip_blocks=("10.0.0.0/24",)),)),
                                        name="a"),), conn(source_ip="10.0.1.7"), False, ""),
    ("DENY notIpBlocks", (policy(AuthzRule(sources=(Source(not_ip_blocks=("10.0.0.0/24",)),)),
                                 action="DENY", name="d"),), conn(source_ip="192.0.2.1"),
     False, "foo/d"),
    ("DENY notPorts", (policy(to(not_ports=("9000",)), action="DENY", name="d"),), conn(9001),
     False, "foo/d"),
    ("when destination.port", (policy(AuthzRule(when=(Condition(key="destination.port",
                                                                values=("9001",)),)), name="a"),),
     conn(9001), True, "foo/a"),
    ("when source.ip notValues", (policy(AuthzRule(when=(Condition(key="source.ip",
                                                                   not_values=("10.0.0.5",)),)),
                                         name="a"),), conn(), False, ""),
    ("when source.namespace / principal",
     (policy(AuthzRule(when=(Condition(key="source.namespace", values=("foo",)),
                             Condition(key="source.principal", values=(SLEEP,)))), name="a"),),
     conn(), True, "foo/a"),
    ("DENY before ALLOW", (policy(PORTS, name="allow"),
                           policy(AuthzRule(sources=(Source(namespaces=("foo",)),)),
                                  action="DENY", name="deny")), conn(), False, "foo/deny"),
    ("AUDIT only: allowed", (policy(AuthzRule(), action="AUDIT", name="audit"),), conn(), True,
     ""),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policies", "facts", "allowed", "deciding"),
    [case[1:] for case in TCP_CASES],
    ids=[case[0] for case in TCP_CASES],
)
def test_connection_decision(
    policies: tuple[AuthzPolicy, ...], facts: ConnectionFacts, allowed: bool, deciding: str
) -> None:
    decision = authorizer(*policies).decide_connection(facts)
    assert (decision.allowed, decision.policy) == (allowed, deciding)
    assert decision.shadow is None


def test_audit_marks_a_connection() -> None:
    audit = policy(to(methods=("GET",)), action="AUDIT", name="audit")
    decision = authorizer(audit).decide_connection(conn())
    # like DENY, an AUDIT rule drops its HTTP-only fields on TCP
    assert decision == Decision(True, "no ALLOW policy applies", "", True)


def test_http_requests_still_see_the_http_fields() -> None:
    """The TCP view must not leak into HTTP: methods still decide requests."""
    auth = authorizer(policy(PORTS_AND_GET, action="DENY", name="deny-get"))
    request = RequestFacts(SLEEP, "foo", "10.0.0.5", "POST", "/", "h", 9000, {})
    assert auth.decide(request).allowed
    assert not auth.decide(request._replace(method="GET")).allowed


# ---------------------------------------------------------------- dry run

DENY_ALL = AuthzRule()


def test_dry_run_deny_all_does_not_deny_and_reports_its_shadow_result() -> None:
    auth = authorizer(policy(DENY_ALL, action="DENY", name="deny-all", dry_run=True))
    assert not auth.empty
    assert auth.applied == ()
    assert auth.dry_run == ("foo/deny-all",)
    shadow = ShadowDecision(False, "denied by dry-run DENY policy foo/deny-all", "foo/deny-all")
    assert auth.decide_connection(conn()) == Decision(
        True, "no authorization policy applies", "", False, shadow
    )
    request = RequestFacts(SLEEP, "foo", "10.0.0.5", "GET", "/", "h", 9000, {})
    assert auth.decide(request).allowed
    assert auth.decide(request).shadow == shadow


def test_dry_run_allow_is_not_an_allow_policy_for_the_real_decision() -> None:
    """A dry-run ALLOW must not turn on "ALLOW policies exist, none matched: deny"."""
    auth = authorizer(policy(to(ports=("9001",)), name="only-9001", dry_run=True))
    decision = auth.decide_connection(conn(9000))
    assert decision.allowed
    assert decision.shadow == ShadowDecision(False, "no dry-run ALLOW policy matched", "")
    assert auth.decide_connection(conn(9001)).shadow == ShadowDecision(
        True, "allowed by dry-run ALLOW policy foo/only-9001", "foo/only-9001"
    )


DRY_RUN_CASES: list[tuple[str, tuple[AuthzPolicy, ...], int, bool, bool | None]] = [
    ("enforced deny stays, dry-run allow shadows",
     (policy(DENY_ALL, action="DENY", name="d"), policy(PORTS, name="a", dry_run=True)), 9000,
     False, True),
    ("enforced allow stays, dry-run deny shadows",
     (policy(PORTS, name="a"), policy(DENY_ALL, action="DENY", name="d", dry_run=True)), 9000,
     True, False),
    ("enforced allow-nothing with a dry-run allow",
     (policy(name="nothing"), policy(PORTS, name="a", dry_run=True)), 9000, False, True),
    ("dry-run ALLOW with methods never matches on TCP",
     (policy(PORTS_AND_GET, name="a", dry_run=True),), 9000, True, False),
    ("dry-run DENY with methods+ports shadows a deny on that port",
     (policy(PORTS_AND_GET, action="DENY", name="d", dry_run=True),), 9000, True, False),
    ("dry-run DENY with methods+ports, other port",
     (policy(PORTS_AND_GET, action="DENY", name="d", dry_run=True),), 9001, True, True),
    ("no dry-run policy: no shadow", (policy(PORTS, name="a"),), 9000, True, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policies", "port", "allowed", "shadow_allowed"),
    [case[1:] for case in DRY_RUN_CASES],
    ids=[case[0] for case in DRY_RUN_CASES],
)
def test_dry_run_decisions(
    policies: tuple[AuthzPolicy, ...], port: int, allowed: bool, shadow_allowed: bool | None
) -> None:
    decision = authorizer(*policies).decide_connection(conn(port))
    assert decision.allowed is allowed
    assert (decision.shadow.allowed if decision.shadow else None) is shadow_allowed
