"""The ADS protocol decisions as transcripts: what Envoy sends, what the server answers."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from proxy.envoy.ads_protocol import AdsState, AdsStream, ApplyState, Nack, XdsError
from proxy.envoy.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, XdsResources


def cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.seconds = timeout_s
    return c


def listener(name: str, port: int = 10000) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name)
    lst.address.socket_address.address = "127.0.0.1"
    lst.address.socket_address.port_value = port
    return lst


def route(name: str, prefix: str = "/") -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    rc.virtual_hosts.add(name="vh", domains=["*"]).routes.add().match.prefix = prefix
    return rc


def endpoints(name: str, port: int = 8080) -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    sa = cla.endpoints.add().lb_endpoints.add().endpoint.address.socket_address
    sa.address, sa.port_value = "127.0.0.1", port
    return cla


def secret(name: str, pem: str = "CERT") -> secret_pb2.Secret:
    s = secret_pb2.Secret(name=name)
    s.tls_certificate.certificate_chain.inline_string = pem
    return s


def snapshot(**kinds: dict) -> XdsResources:
    return XdsResources(**kinds)


def request(
    type_url: str,
    names: tuple[str, ...] = (),
    *,
    version: str = "",
    nonce: str = "",
    error: str = "",
) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(
        type_url=type_url,
        resource_names=list(names),
        version_info=version,
        response_nonce=nonce,
        node=base_pb2.Node(id="sidecar~reviews-1"),
    )
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=13, message=error))
    return req


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for any_ in response.resources:
        for kind in (
            cluster_pb2.Cluster,
            listener_pb2.Listener,
            route_pb2.RouteConfiguration,
            endpoint_pb2.ClusterLoadAssignment,
            secret_pb2.Secret,
        ):
            if any_.type_url.endswith(kind.DESCRIPTOR.full_name):
                msg = kind()
                any_.Unpack(msg)
                out.append(getattr(msg, "name", "") or getattr(msg, "cluster_name", ""))
    return out


def ack(
    stream: AdsStream, response: discovery_pb2.DiscoveryResponse, names: tuple[str, ...] = ()
) -> list:
    return stream.on_request(
        request(response.type_url, names, version=response.version_info, nonce=response.nonce)
    )


BASE = snapshot(
    clusters={"outbound|9080||reviews": cluster("outbound|9080||reviews")},
    endpoints={"outbound|9080||reviews": endpoints("outbound|9080||reviews")},
    listeners={"virtualOutbound": listener("virtualOutbound")},
    routes={"9080": route("9080")},
    secrets={"default": secret("default")},
)


def test_first_requests_get_the_snapshot_and_acks_are_recorded():
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    [cds] = stream.on_request(request(CLUSTER))
    assert (cds.type_url, cds.version_info, names_of(cds)) == (
        CLUSTER,
        "1",
        ["outbound|9080||reviews"],
    )
    assert cds.nonce
    assert state.status[CLUSTER].state is ApplyState.PENDING
    # Envoy ACKs CDS and asks for the endpoints of the cluster it got
    assert ack(stream, cds) == []
    assert state.status[CLUSTER].version_acked == "1"
    assert state.status[CLUSTER].state is ApplyState.APPLIED
    [eds] = stream.on_request(request(ENDPOINT, ("outbound|9080||reviews",)))
    assert names_of(eds) == ["outbound|9080||reviews"]
    [lds] = stream.on_request(request(LISTENER))
    [rds] = stream.on_request(request(ROUTE, ("9080",)))
    [sds] = stream.on_request(request(SECRET, ("default",)))
    assert [names_of(r) for r in (lds, rds, sds)] == [["virtualOutbound"], ["9080"], ["default"]]
    nonces = {r.nonce for r in (cds, eds, lds, rds, sds)}
    assert len(nonces) == 5
    assert stream.node_id == "sidecar~reviews-1"


def test_requests_before_any_snapshot_are_answered_when_it_arrives():
    state = AdsState()
    stream = AdsStream(state)
    assert stream.on_request(request(CLUSTER)) == []
    assert stream.on_request(request(LISTENER)) == []
    steps = state.set_resources(BASE)
    out = stream.on_push(steps)
    # only what was asked for; the named types come when Envoy asks for them
    assert [r.type_url for r in out] == [CLUSTER, LISTENER]


def test_named_types_answer_only_the_names_asked_for():
    state = AdsState()
    state.set_resources(snapshot(routes={"a": route("a"), "b": route("b")}))
    stream = AdsStream(state)
    [rds] = stream.on_request(request(ROUTE, ("b",)))
    assert names_of(rds) == ["b"]
    # unknown names only: nothing to say
    assert AdsStream(state).on_request(request(ROUTE, ("zzz",))) == []


def test_nack_keeps_last_good_version_records_message_and_is_not_resent():
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    [lds] = stream.on_request(request(LISTENER))
    ack(stream, lds)
    steps = state.set_resources(
        snapshot(
            **{**BASE.__dict__, "listeners": {"virtualOutbound": listener("virtualOutbound", 1)}}
        )
    )
    [lds2] = stream.on_push(steps)
    assert lds2.version_info == "2"
    out = stream.on_request(
        request(LISTENER, version="1", nonce=lds2.nonce, error="cannot bind 127.0.0.1:1")
    )
    assert out == []  # no resend of the rejected config
    status = state.status[LISTENER]
    assert status.version_acked == "1"
    assert status.last_nack == Nack("2", "cannot bind 127.0.0.1:1")
    assert status.state is ApplyState.REJECTED
    # a fixed snapshot is pushed and ACKed: APPLIED again, the NACK stays on record
    [lds3] = stream.on_push(state.set_resources(BASE))
    ack(stream, lds3)
    assert state.status[LISTENER].state is ApplyState.APPLIED
    assert state.status[LISTENER].version_acked == "3"


def test_stale_nonce_is_ignored():
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    [lds1] = stream.on_request(request(LISTENER))
    changed = snapshot(
        **{**BASE.__dict__, "listeners": {"virtualOutbound": listener("virtualOutbound", 2)}}
    )
    [lds2] = stream.on_push(state.set_resources(changed))
    # the ACK of the first response arrives after the second was sent: not an ACK of "2"
    assert stream.on_request(request(LISTENER, version="1", nonce=lds1.nonce)) == []
    assert state.status[LISTENER].version_acked == ""
    ack(stream, lds2)
    assert state.status[LISTENER].version_acked == "2"


def test_only_changed_types_are_pushed_with_their_own_version():
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    for t, names in (
        (CLUSTER, ()),
        (ENDPOINT, ("outbound|9080||reviews",)),
        (LISTENER, ()),
        (ROUTE, ("9080",)),
        (SECRET, ("default",)),
    ):
        [r] = stream.on_request(request(t, names))
        ack(stream, r, names)
    # byte-identical snapshot (fresh message objects): nothing to push
    same = snapshot(
        clusters={"outbound|9080||reviews": cluster("outbound|9080||reviews")},
        endpoints={"outbound|9080||reviews": endpoints("outbound|9080||reviews")},
        listeners={"virtualOutbound": listener("virtualOutbound")},
        routes={"9080": route("9080")},
        secrets={"default": secret("default")},
    )
    assert state.set_resources(same) == []
    # a certificate rotation: SDS only, version 2 of SDS while the others stay at 1
    rotated = snapshot(**{**BASE.__dict__, "secrets": {"default": secret("default", "NEW")}})
    out = stream.on_push(state.set_resources(rotated))
    assert [(r.type_url, r.version_info) for r in out] == [(SECRET, "2")]
    assert state.snapshot[CLUSTER].version == "1"


def test_push_order_is_make_before_break_with_removals_last():
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    subscribed = {
        CLUSTER: (),
        ENDPOINT: ("outbound|9080||reviews",),
        LISTENER: (),
        ROUTE: ("9080",),
    }
    for t, names in subscribed.items():
        [r] = stream.on_request(request(t, names))
        ack(stream, r, names)
    # reviews moves to a new cluster and a new listener; the old ones go
    new = snapshot(
        clusters={"outbound|9080|v2|reviews": cluster("outbound|9080|v2|reviews")},
        endpoints={"outbound|9080|v2|reviews": endpoints("outbound|9080|v2|reviews")},
        listeners={"0.0.0.0_9080": listener("0.0.0.0_9080", 9080)},
        routes={"9080": route("9080", "/v2")},
        secrets={"default": secret("default")},
    )
    out = stream.on_push(state.set_resources(new))
    summary = [(r.type_url, sorted(names_of(r))) for r in out]
    assert summary == [
        (CLUSTER, ["outbound|9080|v2|reviews", "outbound|9080||reviews"]),  # added, old kept
        (LISTENER, ["0.0.0.0_9080", "virtualOutbound"]),
        (ROUTE, ["9080"]),
        (LISTENER, ["0.0.0.0_9080"]),  # removals after, listeners before clusters
        (CLUSTER, ["outbound|9080|v2|reviews"]),
    ]
    # EDS for the new cluster: sent when Envoy asks for it (it learns the name from CDS)
    [eds] = stream.on_request(
        request(
            ENDPOINT,
            ("outbound|9080|v2|reviews",),
            version="1",
            nonce=stream._subscriptions[ENDPOINT].nonce,
        )
    )
    assert names_of(eds) == ["outbound|9080|v2|reviews"]
    assert [r.version_info for r in out] == ["2", "2", "2", "3", "3"]


def test_new_stream_gets_the_full_current_snapshot():
    state = AdsState()
    state.set_resources(BASE)
    old = AdsStream(state, 1)
    [lds] = old.on_request(request(LISTENER))
    ack(old, lds)
    changed = snapshot(**{**BASE.__dict__, "listeners": {"l2": listener("l2", 2)}})
    old.on_push(state.set_resources(changed))
    # Envoy restarts (or reconnects to a restarted sidecar) with its last version
    new = AdsStream(state, 2)
    [lds_new] = new.on_request(request(LISTENER, version="1"))
    assert names_of(lds_new) == ["l2"]  # the current snapshot, no leftover of the union
    assert lds_new.version_info == state.snapshot[LISTENER].version
    [cds_new] = new.on_request(request(CLUSTER, version="1"))
    assert names_of(cds_new) == ["outbound|9080||reviews"]


def test_removed_resource_disappears_from_wildcard_type():
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    [cds] = stream.on_request(request(CLUSTER))
    ack(stream, cds)
    out = stream.on_push(state.set_resources(snapshot(listeners=BASE.listeners)))
    cds_out = [r for r in out if r.type_url == CLUSTER]
    assert [names_of(r) for r in cds_out] == [[]]


def test_named_subscription_grows_on_ack_and_unchanged_names_are_not_resent():
    state = AdsState()
    state.set_resources(snapshot(endpoints={"a": endpoints("a"), "b": endpoints("b")}))
    stream = AdsStream(state)
    [eds] = stream.on_request(request(ENDPOINT, ("a",)))
    assert names_of(eds) == ["a"]
    [eds2] = ack(stream, eds, ("a", "b"))
    assert sorted(names_of(eds2)) == ["a", "b"]
    assert ack(stream, eds2, ("a", "b")) == []
    # a change to "b" only: pushed; a change to a name nobody asked for: not pushed
    out = stream.on_push(
        state.set_resources(
            snapshot(endpoints={"a": endpoints("a"), "b": endpoints("b", 1), "c": endpoints("c")})
        )
    )
    assert [sorted(names_of(r)) for r in out] == [["a", "b"]]
    ack(stream, out[0], ("a", "b"))
    assert (
        stream.on_push(
            state.set_resources(
                snapshot(
                    endpoints={"a": endpoints("a"), "b": endpoints("b", 1), "c": endpoints("c", 2)}
                )
            )
        )
        == []
    )


def test_resource_of_the_wrong_type_is_refused_naming_it():
    with pytest.raises(XdsError, match=r"'x' is a envoy\.config\.cluster\.v3\.Cluster"):
        AdsState().set_resources(snapshot(listeners={"x": cluster("x")}))


def test_status_changes_are_collected_for_callbacks():
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    [cds] = stream.on_request(request(CLUSTER))
    ack(stream, cds)
    assert [(s.type_url, s.state) for s in stream.status_changes] == [
        (CLUSTER, ApplyState.PENDING),
        (CLUSTER, ApplyState.APPLIED),
    ]


def test_a_new_stream_is_pending_until_it_acks_what_it_was_given():
    state = AdsState()
    state.set_resources(BASE)
    old = AdsStream(state, 1)
    [lds] = old.on_request(request(LISTENER))
    ack(old, lds)
    assert state.status[LISTENER].state is ApplyState.APPLIED
    # Envoy restarted: the new process has not ACKed anything yet
    new = AdsStream(state, 2)
    [lds_new] = new.on_request(request(LISTENER))
    assert state.status[LISTENER].state is ApplyState.PENDING
    ack(new, lds_new)
    assert state.status[LISTENER].state is ApplyState.APPLIED


def test_resource_keyed_under_another_name_is_refused_and_the_snapshot_kept():
    state = AdsState()
    state.set_resources(BASE)
    with pytest.raises(XdsError, match="'a' names itself 'b'"):
        state.set_resources(snapshot(clusters={"a": cluster("b")}))
    with pytest.raises(XdsError, match="'a' names itself 'b'"):
        state.set_resources(snapshot(endpoints={"a": endpoints("b")}))
    assert set(state.snapshot[CLUSTER].resources) == {"outbound|9080||reviews"}


def test_a_changed_cluster_gets_its_endpoints_again_so_it_finishes_warming():
    """Envoy replaces a changed EDS cluster with one that warms until its endpoints
    arrive; its re-subscription reads as an ACK, so the server resends the endpoints
    right after the clusters (else the new cluster settings, e.g. circuit breakers or
    outlier detection, would wait for Envoy's 15 s initial_fetch_timeout)."""
    state = AdsState()
    state.set_resources(BASE)
    stream = AdsStream(state)
    for t, names in ((CLUSTER, ()), (ENDPOINT, ("outbound|9080||reviews",))):
        [r] = stream.on_request(request(t, names))
        ack(stream, r, names)
    name = "outbound|9080||reviews"
    changed = snapshot(**{**BASE.__dict__, "clusters": {name: cluster(name, timeout_s=5)}})
    cds, eds = stream.on_push(state.set_resources(changed))
    assert (cds.type_url, names_of(cds)) == (CLUSTER, [name])
    assert (eds.type_url, eds.version_info, names_of(eds)) == (ENDPOINT, "1", [name])
    # Envoy's re-subscription with the previous nonce is stale: nothing more is sent
    assert stream.on_request(request(ENDPOINT, (name,), version="1", nonce=cds.nonce)) == []
    assert ack(stream, eds, (name,)) == []
    # a cluster and its endpoints changing together: one EDS response, in push order
    both = snapshot(
        **{
            **changed.__dict__,
            "clusters": {name: cluster(name, timeout_s=7)},
            "endpoints": {name: endpoints(name, port=9090)},
        }
    )
    out = stream.on_push(state.set_resources(both))
    assert [r.type_url for r in out] == [CLUSTER, ENDPOINT]
    # a cluster this Envoy has no endpoints subscription for: clusters only
    other = "outbound|9080|v2|reviews"
    added = snapshot(**{**both.__dict__, "clusters": {**both.clusters, other: cluster(other)}})
    assert [r.type_url for r in stream.on_push(state.set_resources(added))] == [CLUSTER]


def test_a_name_subscribed_again_after_it_was_dropped_is_sent_again():
    """A cluster removed and then added back (a Kubernetes Service deleted and applied
    again): Envoy drops the endpoints it unsubscribed from, so when it asks for the same
    name again it must get them, byte-identical or not, or the new cluster never warms."""
    state = AdsState()
    state.set_resources(snapshot(endpoints={"a": endpoints("a"), "b": endpoints("b")}))
    stream = AdsStream(state)
    [eds] = stream.on_request(request(ENDPOINT, ("a", "b")))
    assert sorted(names_of(eds)) == ["a", "b"]
    # cluster "b" goes away: Envoy narrows its subscription (an ACK naming only "a")
    assert stream.on_push(state.set_resources(snapshot(endpoints={"a": endpoints("a")}))) == []
    assert ack(stream, eds, ("a",)) == []
    # "b" comes back unchanged; Envoy subscribes to it again once its cluster is back
    stream.on_push(
        state.set_resources(snapshot(endpoints={"a": endpoints("a"), "b": endpoints("b")}))
    )
    [again] = ack(stream, eds, ("a", "b"))
    assert sorted(names_of(again)) == ["a", "b"]
