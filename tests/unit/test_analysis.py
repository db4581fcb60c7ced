"""`meshctl.analysis`: each analyzer on small tables of resources and instances, in the
spirit of Istio's analyzer testdata (one misconfiguration per case)."""

from __future__ import annotations

import pytest

from mesh.messages import Endpoint, EndpointSet, ResourceDocument
from mesh.resources import Resource, load_yaml, parse_resource
from meshctl.analysis import analyze, build_context, overlay, parse_files


def _resources(text: str) -> list[Resource]:
    return [parse_resource(d, source="t.yaml", index=i) for i, d in enumerate(load_yaml(text, "t"))]


def _instances(*specs: tuple[str, str, bool]) -> list[EndpointSet]:
    """(service, version, mtls) per instance, all in namespace default."""
    sets: dict[str, EndpointSet] = {}
    for service, version, mtls in specs:
        s = sets.setdefault(service, EndpointSet(namespace="default", service=service, revision=1))
        s.endpoints.append(
            Endpoint(
                instance=f"{service}-{version}-{len(s.endpoints)}",
                address="127.0.0.1:1",
                labels={"app": service, "version": version},
                version=version,
                identity=f"spiffe://cluster.local/ns/default/sa/{service}" if mtls else "",
            )
        )
    return list(sets.values())


BOOKINFO = _instances(
    ("productpage", "v1", True),
    ("reviews", "v1", True),
    ("reviews", "v2", True),
    ("ratings", "v1", True),
)

DR_REVIEWS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def _vs(name: str, http: str, hosts: str = "[reviews]", extra: str = "") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}}}
spec:
  hosts: {hosts}
{extra}  http:
{http}
"""


def _authz(name: str, spec: str, annotations: str = "") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}{annotations}}}
spec:
{spec}
"""


CASES = [
    (
        "clean",
        DR_REVIEWS
        + "---"
        + _vs("reviews", "  - route:\n    - destination: {host: reviews, subset: v1}"),
        [],
    ),
    (
        "subset not defined",
        DR_REVIEWS
        + "---"
        + _vs("reviews", "  - route:\n    - destination: {host: reviews, subset: v3}"),
        [
            (
                "IST0101",
                "Error",
                "VirtualService reviews.default",
                'Referenced host+subset in destinationrule not found: "reviews+v3" '
                "(defined: v1, v2; requests to it fail 503 NC)",
            )
        ],
    ),
    (
        "subset without any destination rule",
        _vs("reviews", "  - route:\n    - destination: {host: reviews, subset: v1}"),
        [
            (
                "IST0101",
                "Error",
                "VirtualService reviews.default",
                'Referenced host+subset in destinationrule not found: "reviews+v1" '
                "(defined: no DestinationRule; requests to it fail 503 NC)",
            )
        ],
    ),
    (
        "unknown host",
        _vs("reviews", "  - route:\n    - destination: {host: reviewz}"),
        [
            (
                "IST0101",
                "Error",
                "VirtualService reviews.default",
                'Referenced host not found: "reviewz" (no instance of default/reviewz is registered)',
            )
        ],
    ),
    (
        "missing gateway",
        _vs(
            "front",
            "  - route:\n    - destination: {host: productpage}",
            hosts='["*"]',
            extra="  gateways: [bookinfo-gateway]\n",
        ),
        [
            (
                "IST0101",
                "Error",
                "VirtualService front.default",
                'Referenced gateway not found: "bookinfo-gateway"',
            )
        ],
    ),
    (
        "rule after a catch-all",
        _vs(
            "reviews",
            "  - route:\n    - destination: {host: reviews}\n"
            "  - match:\n    - headers: {end-user: {exact: jason}}\n"
            "    route:\n    - destination: {host: reviews}",
        ),
        [
            (
                "IST0130",
                "Warning",
                "VirtualService reviews.default",
                "VirtualService rule #1 not used (rule #0 before it matches every request).",
            )
        ],
    ),
    (
        "two rules without matches (Istio's own case)",
        _vs(
            "reviews",
            "  - name: faulty\n    route:\n    - destination: {host: reviews}\n"
            "  - route:\n    - destination: {host: ratings}",
        ),
        [
            (
                "IST0130",
                "Warning",
                "VirtualService reviews.default",
                "VirtualService rule #1 not used (only the last rule can have no matches).",
            )
        ],
    ),
    (
        "duplicate match",
        _vs(
            "reviews",
            "  - match:\n    - uri: {prefix: /a}\n    route:\n    - destination: {host: reviews}\n"
            "  - match:\n    - uri: {prefix: /a}\n    - uri: {prefix: /b}\n"
            "    route:\n    - destination: {host: reviews}",
        ),
        [
            (
                "IST0131",
                "Info",
                "VirtualService reviews.default",
                "VirtualService rule #1 match #0 is not used (duplicate/overlapping match in rule #0).",
            )
        ],
    ),
    (
        "every match duplicated",
        _vs(
            "reviews",
            "  - name: first\n    match:\n    - uri: {prefix: /a}\n    route:\n    - destination: {host: reviews}\n"
            "  - match:\n    - {uri: {prefix: /a}, name: again}\n    route:\n    - destination: {host: reviews}",
        ),
        [
            (
                "IST0130",
                "Warning",
                "VirtualService reviews.default",
                "VirtualService rule #1 not used (all matches used by prior rules).",
            ),
            (
                "IST0131",
                "Info",
                "VirtualService reviews.default",
                'VirtualService rule #1 match "again" is not used (duplicate/overlapping match in rule "first").',
            ),
        ],
    ),
    (
        "two virtual services for one host",
        _vs("a", "  - route:\n    - destination: {host: reviews}")
        + "---"
        + _vs(
            "b",
            "  - route:\n    - destination: {host: reviews}",
            hosts="[reviews.default.svc.cluster.local]",
        ),
        [
            (
                "IST0109",
                "Error",
                f"VirtualService {name}.default",
                "The VirtualServices default/a,default/b associated with mesh gateway define the same "
                "host reviews.default.svc.cluster.local which can lead to undefined behavior. This can "
                "be fixed by merging the conflicting VirtualServices into a single resource.",
            )
            for name in ("a", "b")
        ],
    ),
    (
        "subset matching no instance",
        DR_REVIEWS.replace("v2}}", "v2}}\n  - {name: v3, labels: {version: v3}}"),
        [
            (
                "MW0101",
                "Warning",
                "DestinationRule reviews.default",
                'Subset "v3" (version=v3) matches no registered instance of default/reviews: '
                "requests routed to it fail 503 UH.",
            )
        ],
    ),
    (
        "authorization policy selecting nothing",
        _authz(
            "ghost",
            "  selector: {matchLabels: {app: ghost}}\n  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [POST]}",
        ),
        [
            (
                "IST0127",
                "Warning",
                "AuthorizationPolicy ghost.default",
                "No matching workloads for this resource with the following labels: app=ghost",
            )
        ],
    ),
    (
        "allow nothing",
        _authz("allow-nothing", "  selector: {matchLabels: {app: reviews}}"),
        [
            (
                "MW0102",
                "Warning",
                "AuthorizationPolicy allow-nothing.default",
                "ALLOW policy without rules matches no request: every request to the workloads with "
                "app=reviews is denied (403 RBAC: access denied) unless another ALLOW policy matches.",
            )
        ],
    ),
    (
        "deny everything",
        _authz("deny-all", "  action: DENY\n  rules:\n  - {}"),
        [
            (
                "MW0102",
                "Warning",
                "AuthorizationPolicy deny-all.default",
                "DENY rule #0 has no from, to or when: every request to every workload in namespace "
                "default is denied (403 RBAC: access denied).",
            )
        ],
    ),
    (
        "dry-run annotation",
        _authz(
            "trial",
            "  action: DENY\n  rules:\n  - to:\n    - operation: {methods: [DELETE]}",
            annotations=', annotations: {"istio.io/dry-run": "true"}',
        ),
        [
            (
                "MW0104",
                "Info",
                "AuthorizationPolicy trial.default",
                "Annotation istio.io/dry-run=true: this policy is evaluated in shadow and never "
                "enforced; its would-be decisions are counted in "
                "meshwork_proxy_authz_dry_run_total and recorded in access records "
                "(dry_run_result, dry_run_policy).",
            )
        ],
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_analyzers(case: str, text: str, expected: list[tuple[str, str, str, str]]) -> None:
    messages = analyze(build_context(_resources(text), BOOKINFO))
    assert [(m.code, m.level, str(m.resource), m.text) for m in messages] == expected


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default}
spec:
  mtls: {mode: STRICT}
"""


def test_strict_mtls_is_flagged_only_when_plaintext_instances_are_registered() -> None:
    assert analyze(build_context(_resources(STRICT), BOOKINFO)) == []
    with_plaintext = [*BOOKINFO, *_instances(("curl", "v1", False))]
    messages = analyze(build_context(_resources(STRICT), with_plaintext))
    assert [(m.code, m.level) for m in messages] == [("MW0103", "Warning")]
    assert "curl.default" in messages[0].text


def test_errors_sort_first_and_only_filters_by_resource() -> None:
    text = (
        _vs("reviews", "  - route:\n    - destination: {host: reviews, subset: v9}")
        + "---"
        + _authz("allow-nothing", "  selector: {matchLabels: {app: ratings}}")
    )
    ctx = build_context(_resources(text), BOOKINFO)
    messages = analyze(ctx)
    assert [m.level for m in messages] == ["Error", "Warning"]
    only = analyze(ctx, only=[messages[1].resource])
    assert [m.code for m in only] == ["MW0102"]


def test_files_overlay_the_live_config_and_invalid_documents_are_ist0106() -> None:
    live = _resources(
        DR_REVIEWS
        + "---"
        + _vs("reviews", "  - route:\n    - destination: {host: reviews, subset: v1}")
    )
    text = _vs("reviews", "  - route:\n    - destination: {host: reviews, subset: v3}") + (
        "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: broken}\nspec:\n  hosts: [ratings]\n  htp: []\n"
    )
    docs = [
        ResourceDocument(source="new.yaml", index=i, body=b)
        for i, b in enumerate(load_yaml(text, "new.yaml"))
    ]
    files, problems = parse_files(docs)
    assert [(m.code, str(m.resource)) for m in problems] == [
        ("IST0106", "VirtualService broken.default")
    ]
    assert "htp" in problems[0].text
    messages = analyze(build_context(overlay(live, files), BOOKINFO))
    assert [m.code for m in messages] == ["IST0101"]
    assert "reviews+v3" in messages[0].text
