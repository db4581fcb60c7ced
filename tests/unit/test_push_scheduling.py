"""Scoped, debounced config pushes: the generic debouncer with a fake clock, and which
compiled configs a resource change can affect (`services.config.push`)."""

from __future__ import annotations

import pytest

from mesh.debounce import Debouncer, DebounceSettings
from mesh.hosts import ServiceRef
from mesh.resources import Resource, load_yaml, parse_resource
from services.config.push import PushScheduler, PushScope, scope_of_change
from services.config.settings import ConfigSettings, ConfigSettingsError

ROOT = "istio-system"
QUIET, MAX_DELAY = 0.010, 0.100


def union(a: frozenset[str], b: frozenset[str]) -> frozenset[str]:
    return a | b


def debouncer() -> Debouncer[frozenset[str]]:
    return Debouncer(DebounceSettings(QUIET, MAX_DELAY), union)


# ---------------------------------------------------------------- debouncer


def test_nothing_pending_is_never_due() -> None:
    d = debouncer()
    assert d.due_at() is None
    assert d.take(100.0) is None


def test_quiet_period_after_the_last_change() -> None:
    d = debouncer()
    d.add(frozenset({"a"}), 1.000)
    d.add(frozenset({"b"}), 1.006)
    assert d.due_at() == pytest.approx(1.016)
    assert d.take(1.015) is None  # still inside the quiet period of the second change
    batch = d.take(1.016)
    assert batch is not None
    assert batch.request == {"a", "b"} and batch.changes == 2
    assert batch.first_at == 1.000 and batch.last_at == 1.006
    assert d.pending_changes == 0


def test_max_delay_under_a_constant_stream() -> None:
    d = debouncer()
    now, pushes, added = 0.0, [], 0
    while now < 0.35:  # a change every 5 ms: the quiet period never elapses
        d.add(frozenset({f"svc{added}"}), now)
        added += 1
        batch = d.take(now)
        if batch is not None:
            pushes.append((now, batch.first_at, batch.changes))
            d.done()
        now = round(now + 0.005, 6)
    assert len(pushes) == 3
    # each push went out once its oldest change had waited the maximum delay (to within
    # one 5 ms step of this fake clock), never later
    assert all(MAX_DELAY - 1e-9 <= at - first <= MAX_DELAY + 0.005 for at, first, _ in pushes)
    assert sum(n for _, _, n in pushes) + d.pending_changes == added  # nothing lost


def test_one_push_in_flight_changes_meanwhile_merge_into_the_next() -> None:
    d = debouncer()
    d.add(frozenset({"a"}), 0.0)
    first = d.take(0.010)
    assert first is not None and first.request == {"a"}
    d.add(frozenset({"b"}), 0.011)
    d.add(frozenset({"c"}), 0.050)
    assert d.due_at() is None and d.take(1.0) is None  # the first push is still running
    d.done()
    second = d.take(1.0)  # long past due: goes at once
    assert second is not None
    assert second.request == {"b", "c"} and second.changes == 2 and second.first_at == 0.011


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least the quiet period"):
        DebounceSettings(0.1, 0.05)
    with pytest.raises(ValueError, match=">= 0"):
        DebounceSettings(-1, 1)


def test_config_settings_parse_push_options() -> None:
    s = ConfigSettings.from_options({"push-quiet-ms": "20", "push-max-delay-ms": "500"})
    assert s.push_debounce == DebounceSettings(0.02, 0.5)
    with pytest.raises(ConfigSettingsError, match="push-quiet-ms: expected whole"):
        ConfigSettings.from_options({"push-quiet-ms": "fast"})
    with pytest.raises(ConfigSettingsError, match="must be at least push-quiet-ms"):
        ConfigSettings.from_options({"push-quiet-ms": "50", "push-max-delay-ms": "10"})


# ---------------------------------------------------------------- scope of a change


def res(text: str) -> Resource:
    return parse_resource(load_yaml(text, "t.yaml")[0], source="t.yaml", index=0)


def vs(hosts: str, dest: str, namespace: str = "default", gateways: str = "") -> Resource:
    gw = f"\n  gateways: [{gateways}]" if gateways else ""
    return res(f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: v, namespace: {namespace}}}
spec:
  hosts: [{hosts}]{gw}
  http:
  - route:
    - destination: {{host: {dest}}}
""")


def ref(name: str, ns: str = "default") -> ServiceRef:
    return ServiceRef(ns, name)


def test_virtual_service_affects_only_the_hosts_it_names() -> None:
    scope = scope_of_change(None, vs("reviews", "reviews"), ROOT)
    assert scope == PushScope(routes=frozenset({ref("reviews")}))
    known = {ref("reviews"), ref("ratings"), ref("details")}
    assert scope.routes_among(known) == {ref("reviews")}
    assert scope.inbound_among(known) == set()


def test_hosts_removed_by_a_change_are_recompiled_too() -> None:
    scope = scope_of_change(vs("reviews", "reviews"), vs("ratings", "ratings"), ROOT)
    assert scope.routes == {ref("reviews"), ref("ratings")}
    # deletion: the old version's hosts
    assert scope_of_change(vs("reviews", "reviews"), None, ROOT).routes == {ref("reviews")}


def test_virtual_service_destinations_and_namespaces() -> None:
    scope = scope_of_change(None, vs("reviews", "ratings.prod"), ROOT)
    assert scope.routes == {ref("reviews"), ref("ratings", "prod")}
    assert not scope.gateways


def test_wildcard_hosts_match_known_destinations_and_external_hosts_none() -> None:
    scope = scope_of_change(None, vs("'*.prod.svc.cluster.local', api.example.com", "x"), ROOT)
    known = {ref("a", "prod"), ref("b", "prod"), ref("a", "default")}
    assert scope.routes_among(known) == {ref("a", "prod"), ref("b", "prod"), ref("x")}


def test_virtual_service_bound_to_a_gateway_affects_gateway_configs() -> None:
    scope = scope_of_change(None, vs("bookinfo.example.com", "productpage", gateways="gw"), ROOT)
    assert scope.gateways and scope.routes == {ref("productpage")}


def test_destination_rule_affects_only_its_host() -> None:
    dr = res("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: r, namespace: default}
spec: {host: reviews}
""")
    assert scope_of_change(None, dr, ROOT) == PushScope(routes=frozenset({ref("reviews")}))


def test_gateway_affects_only_gateway_configs() -> None:
    gw = res("""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: default}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
""")
    assert scope_of_change(gw, gw, ROOT) == PushScope(gateways=True)


def policy(kind: str, namespace: str, selector: bool = False) -> Resource:
    api = {
        "PeerAuthentication": "security.istio.io/v1",
        "AuthorizationPolicy": "security.istio.io/v1",
        "RateLimitPolicy": "meshwork.io/v1",
    }[kind]
    sel = "\n  selector: {matchLabels: {app: reviews}}" if selector else ""
    body = {
        "PeerAuthentication": "\n  mtls: {mode: STRICT}",
        "AuthorizationPolicy": "\n  action: DENY\n  rules: [{}]",
        "RateLimitPolicy": "\n  total: {requestsPerSecond: 10}",
    }[kind]
    return res(f"""
apiVersion: {api}
kind: {kind}
metadata: {{name: p, namespace: {namespace}}}
spec:{sel}{body}
""")


@pytest.mark.parametrize("kind", ["PeerAuthentication", "AuthorizationPolicy", "RateLimitPolicy"])
def test_inbound_policies_of_the_namespace_only(kind: str) -> None:
    scope = scope_of_change(None, policy(kind, "prod", selector=True), ROOT)
    assert scope == PushScope(inbound_namespaces=frozenset({"prod"}))
    known = {ref("a", "prod"), ref("b", "default")}
    assert scope.inbound_among(known) == {ref("a", "prod")}
    assert scope.routes_among(known) == set()


@pytest.mark.parametrize("kind", ["PeerAuthentication", "AuthorizationPolicy"])
def test_root_namespace_policies_affect_every_namespace(kind: str) -> None:
    scope = scope_of_change(None, policy(kind, ROOT), ROOT)
    assert scope.inbound_all
    known = {ref("a", "prod"), ref("b", "default")}
    assert scope.inbound_among(known) == known


def test_root_namespace_peer_authentication_with_selector_stays_in_the_root() -> None:
    scope = scope_of_change(None, policy("PeerAuthentication", ROOT, selector=True), ROOT)
    assert scope == PushScope(inbound_namespaces=frozenset({ROOT}))


def test_scheduler_merges_scopes_and_a_full_push_wins() -> None:
    s = PushScheduler(DebounceSettings(QUIET, MAX_DELAY), ROOT)
    s.resources_changed(None, vs("reviews", "reviews"), 0.0)
    s.resources_changed(None, policy("AuthorizationPolicy", "prod"), 0.001)
    s.subjects_appeared(0.002, gateways=True)
    assert s.queue_depth == 3
    batch = s.take(0.012)
    assert batch is not None
    assert batch.request == PushScope(
        routes=frozenset({ref("reviews")}),
        gateways=True,
        inbound_namespaces=frozenset({"prod"}),
    )
    s.done()
    s.resources_changed(None, vs("reviews", "reviews"), 1.0)
    s.everything(1.001)
    full = s.take(2.0)
    assert full is not None and full.request.full
    assert full.request.routes_among({ref("a")}) == {ref("a")}
