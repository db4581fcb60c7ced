"""The delta xDS decisions as transcripts: what Envoy sends on a delta stream (VHDS and
clusters), what the server answers."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from proxy.envoy.ads_protocol import XdsError
from proxy.envoy.delta_protocol import DeltaResource, DeltaState, DeltaStream, delta_resource
from proxy.envoy.resources import CLUSTER, VIRTUAL_HOST

REVIEWS = "outbound_http/reviews.default.svc.cluster.local"
RATINGS = "outbound_http/ratings.default.svc.cluster.local"
OPENING = ["outbound_http/"]


def vhost(name: str, prefix: str = "/") -> DeltaResource:
    vh = route_components_pb2.VirtualHost(name=name, domains=[name.rpartition("/")[2]])
    vh.routes.add().match.prefix = prefix
    return delta_resource(vh)


def with_aliases(resource: DeltaResource, *aliases: str) -> DeltaResource:
    return DeltaResource(resource.name, resource.value, frozenset(aliases))


def cluster(name: str, timeout_s: int = 1) -> DeltaResource:
    c = cluster_pb2.Cluster(name=name)
    c.connect_timeout.seconds = timeout_s
    return delta_resource(c)


def request(
    type_url: str = VIRTUAL_HOST,
    subscribe: tuple[str, ...] = (),
    unsubscribe: tuple[str, ...] = (),
    *,
    nonce: str = "",
    error: str = "",
    initial: dict[str, str] | None = None,
) -> discovery_pb2.DeltaDiscoveryRequest:
    r = discovery_pb2.DeltaDiscoveryRequest(
        type_url=type_url,
        resource_names_subscribe=list(subscribe),
        resource_names_unsubscribe=list(unsubscribe),
        response_nonce=nonce,
        initial_resource_versions=initial or {},
    )
    r.node.id = "productpage-1"
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def summary(response: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, object]:
    return {
        "added": {r.name: (sorted(r.aliases), r.HasField("resource")) for r in response.resources},
        "removed": list(response.removed_resources),
    }


def vhds_stream() -> tuple[DeltaState, DeltaStream]:
    """A VHDS stream past its opening exchange (nothing held yet)."""
    state = DeltaState()
    state.set(VIRTUAL_HOST, [], opening=OPENING)
    stream = DeltaStream(state, stream_id=1)
    [opening] = stream.on_request(request())
    assert summary(opening) == {
        "added": {"outbound_http/": (["outbound_http/"], False)},
        "removed": [],
    }
    assert stream.on_request(request(nonce=opening.nonce)) == []
    return state, stream


def test_vhds_opening_request_is_answered_even_with_nothing_to_give() -> None:
    state = DeltaState()
    stream = DeltaStream(state, stream_id=1)
    # not set yet: the answer waits for the first set
    assert stream.on_request(request()) == []
    state.set(VIRTUAL_HOST, [], opening=OPENING)
    [response] = stream.on_change()
    assert response.type_url == VIRTUAL_HOST and response.nonce == "1-1"
    assert response.system_version_info == "1"
    assert summary(response)["added"] == {"outbound_http/": (["outbound_http/"], False)}
    # an empty first request of VHDS is no wildcard: a later vhost is not pushed
    state.set(VIRTUAL_HOST, [vhost(REVIEWS)], opening=OPENING)
    assert stream.on_change() == []


def test_alias_waits_for_the_agent_then_gets_the_vhost_with_that_alias() -> None:
    state, stream = vhds_stream()
    assert stream.on_request(request(subscribe=("outbound_http/reviews:9080",))) == []
    assert stream.unresolved(VIRTUAL_HOST) == {"outbound_http/reviews:9080"}
    state.set(
        VIRTUAL_HOST, [with_aliases(vhost(REVIEWS), "outbound_http/reviews:9080")], opening=OPENING
    )
    assert stream.unresolved(VIRTUAL_HOST) == set()
    [response] = stream.on_change()
    assert summary(response) == {
        "added": {REVIEWS: (["outbound_http/reviews:9080"], True)},
        "removed": [],
    }
    assert response.resources[0].version == vhost(REVIEWS).version
    # ACKed, same state again: nothing to send
    assert stream.on_request(request(nonce=response.nonce)) == []
    assert stream.acked[VIRTUAL_HOST] == 2
    assert stream.on_change() == []


def test_second_alias_of_a_vhost_already_held_is_answered_again() -> None:
    state, stream = vhds_stream()
    first = "outbound_http/reviews"
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS), first)], opening=OPENING)
    [r1] = stream.on_request(request(subscribe=(first,)))
    assert summary(r1)["added"] == {REVIEWS: ([first], True)}
    second = "outbound_http/reviews.default"
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS), first, second)], opening=OPENING)
    [r2] = stream.on_request(request(subscribe=(second,)))
    # Envoy resumes the request held for `second` only when a resource names it
    assert summary(r2)["added"] == {REVIEWS: ([first, second], True)}


def test_unknown_host_is_answered_once_as_an_empty_resource_naming_it() -> None:
    state, stream = vhds_stream()
    nosuch = "outbound_http/nosuch.default.svc.cluster.local"
    assert stream.on_request(request(subscribe=(nosuch,))) == []
    state.set(VIRTUAL_HOST, [], absent=[nosuch], opening=OPENING)
    [response] = stream.on_change()
    assert summary(response) == {"added": {nosuch: ([nosuch], False)}, "removed": []}
    assert stream.on_change() == []
    # it appears later (the destination was published): the vhost follows
    state.set(VIRTUAL_HOST, [with_aliases(vhost(RATINGS), nosuch)], opening=OPENING)
    [later] = stream.on_change()
    assert summary(later)["added"] == {RATINGS: ([nosuch], True)}


def test_changed_vhost_is_pushed_and_a_removed_one_is_named_removed() -> None:
    state, stream = vhds_stream()
    alias = "outbound_http/reviews"
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS), alias)], opening=OPENING)
    [r1] = stream.on_request(request(subscribe=(alias,)))
    stream.on_request(request(nonce=r1.nonce))
    # a routing change: the new version is pushed
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS, "/v2"), alias)], opening=OPENING)
    [r2] = stream.on_change()
    assert summary(r2)["added"] == {REVIEWS: ([alias], True)}
    assert r2.resources[0].version != r1.resources[0].version
    assert int(r2.system_version_info) > int(r1.system_version_info)
    # the server no longer has it: removed, and the alias is answered absent
    state.set(VIRTUAL_HOST, [], absent=[alias], opening=OPENING)
    [r3] = stream.on_change()
    assert summary(r3) == {"added": {alias: ([alias], False)}, "removed": [REVIEWS]}


def test_nack_is_recorded_and_the_refused_version_not_resent() -> None:
    state, stream = vhds_stream()
    alias = "outbound_http/reviews"
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS), alias)], opening=OPENING)
    [r1] = stream.on_request(request(subscribe=(alias,)))
    assert stream.on_request(request(nonce=r1.nonce, error="bad route")) == []
    assert stream.last_nack[VIRTUAL_HOST].message == "bad route"
    assert stream.on_change() == []
    # a stale nonce is neither an ACK nor a NACK
    acked = stream.acked.get(VIRTUAL_HOST, 0)
    assert stream.on_request(request(nonce="1-99")) == []
    assert stream.acked.get(VIRTUAL_HOST, 0) == acked
    # a new version goes out again
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS, "/fixed"), alias)], opening=OPENING)
    [r2] = stream.on_change()
    assert summary(r2)["added"] == {REVIEWS: ([alias], True)}


def test_unsubscribed_vhost_is_forgotten_and_not_pushed_again() -> None:
    state, stream = vhds_stream()
    alias = "outbound_http/reviews"
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS), alias)], opening=OPENING)
    [r1] = stream.on_request(request(subscribe=(alias,)))
    assert stream.on_request(request(nonce=r1.nonce, unsubscribe=(alias,))) == []
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS, "/v2"), alias)], opening=OPENING)
    assert stream.on_change() == []


def test_wildcard_clusters_with_initial_versions_after_a_reconnect() -> None:
    state = DeltaState()
    a, b = cluster("a"), cluster("b")
    state.set(CLUSTER, [a, b])
    stream = DeltaStream(state, stream_id=2)
    # Envoy reconnects holding `a` at the current version and `gone` the server dropped
    [response] = stream.on_request(request(CLUSTER, initial={"a": a.version, "gone": "0123"}))
    assert summary(response) == {"added": {"b": ([], True)}, "removed": ["gone"]}
    stream.on_request(request(CLUSTER, nonce=response.nonce))
    # a change of `a` reaches the wildcard subscriber; removing `b` is named
    state.set(CLUSTER, [cluster("a", timeout_s=5)])
    [update] = stream.on_change()
    assert summary(update) == {"added": {"a": ([], True)}, "removed": ["b"]}


def test_named_cluster_that_does_not_exist_is_removed() -> None:
    state = DeltaState()
    state.set(CLUSTER, [], absent=["nope"])
    stream = DeltaStream(state, stream_id=3)
    [response] = stream.on_request(request(CLUSTER, subscribe=("nope",)))
    assert summary(response) == {"added": {}, "removed": ["nope"]}


def test_resource_without_a_name_is_refused() -> None:
    with pytest.raises(XdsError, match="without a name"):
        delta_resource(route_components_pb2.VirtualHost())


def test_absent_name_asked_again_waits_for_the_next_set_and_may_exist_by_then() -> None:
    state, stream = vhds_stream()
    nosuch = "outbound_http/later"
    stream.on_request(request(subscribe=(nosuch,)))
    state.set(VIRTUAL_HOST, [], absent=[nosuch], opening=OPENING)
    [absent] = stream.on_change()
    stream.on_request(request(nonce=absent.nonce))
    # Envoy asks again (a new request for that host): not answered from the old state
    assert stream.on_request(request(subscribe=(nosuch,))) == []
    assert stream.unresolved(VIRTUAL_HOST) == {nosuch}
    # the caller looked again and still found nothing: answered absent again
    state.set(VIRTUAL_HOST, [], absent=[nosuch], opening=OPENING)
    [again] = stream.on_change()
    assert summary(again) == {"added": {nosuch: ([nosuch], False)}, "removed": []}
    assert stream.unresolved(VIRTUAL_HOST) == set()
    # asked once more, and this time it exists
    stream.on_request(request(subscribe=(nosuch,)))
    state.set(VIRTUAL_HOST, [with_aliases(vhost(RATINGS), nosuch)], opening=OPENING)
    [found] = stream.on_change()
    assert summary(found)["added"] == {RATINGS: ([nosuch], True)}


def test_reconnected_envoy_keeps_its_vhosts_until_the_new_server_has_answered() -> None:
    """A sidecar restarted next to a running Envoy: the new server knows no vhost yet.
    The vhost the Envoy lists is not removed while its alias waits for an answer, and
    the opening name is answered once, not both added and removed (Envoy refuses a
    response naming a resource in both)."""
    state = DeltaState()
    state.set(VIRTUAL_HOST, [], opening=OPENING)
    stream = DeltaStream(state, stream_id=2)
    alias = "outbound_http/reviews:9080"
    [first] = stream.on_request(
        # what Envoy 1.40 sends (seen in a sidecar's debug log): the wildcard, the
        # alias its held request waits for, and what it has, the opening name included
        request(subscribe=("*", alias), initial={REVIEWS: vhost(REVIEWS).version, OPENING[0]: ""})
    )
    assert summary(first) == {
        "added": {"outbound_http/": (["outbound_http/"], False)},
        "removed": [],
    }
    assert stream.unresolved(VIRTUAL_HOST) == {alias}
    assert stream.on_request(request(nonce=first.nonce)) == []
    # the agent found the destination again: same vhost, same version, nothing to send
    # but the alias it now answers
    state.set(VIRTUAL_HOST, [with_aliases(vhost(REVIEWS), alias)], opening=OPENING)
    [answer] = stream.on_change()
    assert summary(answer) == {"added": {REVIEWS: ([alias], True)}, "removed": []}


def test_a_vhost_the_reconnected_envoy_has_is_removed_once_nothing_waits() -> None:
    state = DeltaState()
    state.set(VIRTUAL_HOST, [], opening=OPENING)
    stream = DeltaStream(state, stream_id=2)
    [first] = stream.on_request(
        request(subscribe=("*",), initial={RATINGS: vhost(RATINGS).version})
    )
    assert summary(first) == {
        "added": {"outbound_http/": (["outbound_http/"], False)},
        "removed": [RATINGS],
    }
