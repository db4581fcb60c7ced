"""The decisions of an ADS server (state of the world), without sockets.

`AdsState` holds the snapshot every connected Envoy is given, one version counter per
type URL, and the status the agent reports (version sent, version ACKed, last NACK).
`AdsStream` is one Envoy's stream: it takes that Envoy's `DiscoveryRequest`s and the
pushes of new snapshots, and returns the `DiscoveryResponse`s to send. The gRPC servicer
(`proxy.envoy.xds_server`) only moves messages between these and the network.

Protocol rules followed (Envoy's xDS protocol document, "ACK/NACK and versioning",
"When to send an update", "Eventual consistency considerations"):

- every response carries the type's `version_info` and a nonce unique on the stream;
  a request whose `response_nonce` is not the last one sent for its type is stale and
  ignored (Envoy sends another for the latest response);
- a request with the last nonce and no `error_detail` ACKs that response; with
  `error_detail` it NACKs it: Envoy keeps its last good configuration, so do we in our
  bookkeeping (the ACKed version stays), we record Envoy's message and send nothing
  until the snapshot changes (resending the rejected config would loop);
- listeners and clusters are wildcard subscriptions (every resource, absence removes);
  routes, endpoints and secrets are asked for by name and answered with the named
  resources we have; the first request of a type on a stream (no nonce: a new Envoy, or
  one reconnecting after the sidecar restarted) always gets the current snapshot; a
  name Envoy stops asking for is forgotten, so asking for it again gets it again;
- make before break: a new snapshot is pushed clusters, endpoints, listeners, routes,
  secrets; a listener or cluster removed by it stays in the first listener/cluster
  response and goes in a second one sent after the routes, so nothing still referenced
  disappears before what replaces it has arrived.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from proxy.envoy.resources import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, XdsResources

# the make-before-break order of a push (Envoy's doc, "Eventual consistency")
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)
# then what a push removes, listeners before the clusters they route to
REMOVAL_ORDER: tuple[str, ...] = (LISTENER, CLUSTER)
# types Envoy subscribes to with a wildcard (every resource the server has)
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})

SHORT_TYPE_NAMES = {LISTENER: "LDS", ROUTE: "RDS", CLUSTER: "CDS", ENDPOINT: "EDS", SECRET: "SDS"}


class XdsError(Exception):
    """Bad input to the xDS server (a resource of the wrong type, a bad snapshot)."""


class ApplyState(enum.Enum):
    """What the agent reports for one type (proxy-status)."""

    NOT_SENT = "NOT_SENT"
    PENDING = "PENDING"  # sent, neither ACKed nor NACKed yet
    APPLIED = "APPLIED"
    REJECTED = "REJECTED"


@dataclass(frozen=True)
class Nack:
    version: str  # the version Envoy rejected
    message: str  # Envoy's own error message


@dataclass(frozen=True)
class TypeStatus:
    type_url: str
    version_sent: str = ""
    version_acked: str = ""
    last_nack: Nack | None = None

    @property
    def short_name(self) -> str:
        return SHORT_TYPE_NAMES.get(self.type_url, self.type_url)

    @property
    def state(self) -> ApplyState:
        if not self.version_sent:
            return ApplyState.NOT_SENT
        if self.version_acked == self.version_sent:
            return ApplyState.APPLIED
        if self.last_nack is not None and self.last_nack.version == self.version_sent:
            return ApplyState.REJECTED
        return ApplyState.PENDING


# one resource serialized: name -> bytes (deterministic), compared to detect changes
Encoded = dict[str, bytes]


def encode(type_url: str, resources: Mapping[str, Message]) -> Encoded:
    out: Encoded = {}
    expected = type_url.removeprefix("type.googleapis.com/")
    for name, message in resources.items():
        if message.DESCRIPTOR.full_name != expected:
            raise XdsError(
                f"resource {name!r} is a {message.DESCRIPTOR.full_name}, not a {expected}"
            )
        own_name = getattr(message, "cluster_name" if type_url == ENDPOINT else "name")
        if own_name != name:
            # Envoy knows a resource by its own name; a mismatch would go unanswered
            raise XdsError(f"resource {name!r} names itself {own_name!r}")
        out[name] = message.SerializeToString(deterministic=True)
    return out


@dataclass(frozen=True)
class TypeSnapshot:
    version: str
    resources: Encoded


@dataclass(frozen=True)
class PushStep:
    """One response per stream for one type: the resources to give (for a named type,
    filtered by each stream's subscription)."""

    type_url: str
    version: str
    resources: Encoded


def _response(
    type_url: str, version: str, nonce: str, resources: Encoded
) -> discovery_pb2.DiscoveryResponse:
    return discovery_pb2.DiscoveryResponse(
        version_info=version,
        type_url=type_url,
        nonce=nonce,
        resources=[
            any_pb2.Any(type_url=type_url, value=value) for _, value in sorted(resources.items())
        ],
    )


class AdsState:
    """The snapshot served to every stream, per-type versions, and the status."""

    def __init__(self) -> None:
        self._counters = {t: itertools.count(1) for t in PUSH_ORDER}
        self.snapshot: dict[str, TypeSnapshot] = {t: TypeSnapshot("", {}) for t in PUSH_ORDER}
        self.status: dict[str, TypeStatus] = {t: TypeStatus(t) for t in PUSH_ORDER}
        self.has_snapshot = False

    def _next_version(self, type_url: str) -> str:
        return str(next(self._counters[type_url]))

    def set_resources(self, resources: XdsResources) -> list[PushStep]:
        """Make `resources` the current snapshot; the steps to push to every stream, in
        order (empty when nothing changed). A type whose resources are byte-identical
        keeps its version and is not pushed."""
        encoded = {t: encode(t, r) for t, r in resources.by_type().items()}
        first = not self.has_snapshot
        self.has_snapshot = True
        steps: list[PushStep] = []
        removals: list[PushStep] = []
        for type_url in PUSH_ORDER:
            old = self.snapshot[type_url]
            new = encoded[type_url]
            if new == old.resources and not first:
                continue
            removed = old.resources.keys() - new.keys()
            if type_url in WILDCARD_TYPES and removed and not first:
                # make before break: keep what goes away until the rest is in place
                kept = {name: old.resources[name] for name in removed}
                union = {**new, **kept}
                if union != old.resources:  # something is added or changed, too
                    steps.append(PushStep(type_url, self._next_version(type_url), union))
                final = PushStep(type_url, self._next_version(type_url), new)
                removals.append(final)
            else:
                final = PushStep(type_url, self._next_version(type_url), new)
                steps.append(final)
            self.snapshot[type_url] = TypeSnapshot(final.version, new)
        removals.sort(key=lambda step: REMOVAL_ORDER.index(step.type_url))
        return steps + removals

    # ------------------------------------------------------------------ status

    def record(self, type_url: str, **changes: Any) -> TypeStatus | None:
        """Update one type's status; the new status if it changed."""
        old = self.status[type_url]
        new = dataclasses.replace(old, **changes)
        if new == old:
            return None
        self.status[type_url] = new
        return new


@dataclass
class _Subscription:
    """What one stream asked for and was last given, for one type."""

    names: frozenset[str] = frozenset()
    wildcard: bool = False
    nonce: str = ""  # the last nonce sent; "" before the first response
    sent_version: str = ""
    sent: Encoded = field(default_factory=dict)  # what the last response carried


class AdsStream:
    """One Envoy's ADS stream: requests and pushes in, responses out.

    `status_changes` collects the `TypeStatus`es this stream changed since the caller
    last drained it (the shell turns them into callbacks)."""

    def __init__(self, state: AdsState, stream_id: int = 0):
        self.state = state
        self.stream_id = stream_id
        self.node_id = ""
        self._subscriptions: dict[str, _Subscription] = {}
        self._nonces = itertools.count(1)
        self.status_changes: list[TypeStatus] = []

    def _record(self, type_url: str, **changes: Any) -> None:
        changed = self.state.record(type_url, **changes)
        if changed is not None:
            self.status_changes.append(changed)

    def _matching(self, sub: _Subscription, resources: Encoded) -> Encoded:
        if sub.wildcard:
            return dict(resources)
        return {name: value for name, value in resources.items() if name in sub.names}

    @staticmethod
    def _has_news(sub: _Subscription, matching: Encoded) -> bool:
        """Whether a named subscription has a resource added or changed. One that went
        away needs no response: Envoy updates only the named resources a response
        carries, and drops the others when nothing references them any more."""
        return any(sub.sent.get(name) != value for name, value in matching.items())

    def _send(
        self, type_url: str, sub: _Subscription, version: str, resources: Encoded
    ) -> discovery_pb2.DiscoveryResponse:
        if not sub.nonce:
            # this Envoy (new, or reconnected) has ACKed nothing of this type yet
            self._record(type_url, version_sent=version, version_acked="")
        else:
            self._record(type_url, version_sent=version)
        sub.nonce = f"{self.stream_id}-{next(self._nonces)}"
        sub.sent_version = version
        sub.sent = resources
        return _response(type_url, version, sub.nonce, resources)

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest
    ) -> list[discovery_pb2.DiscoveryResponse]:
        """Envoy's request (first subscription, ACK, NACK or subscription change)."""
        if request.node.id:
            self.node_id = request.node.id
        type_url = request.type_url
        if type_url not in self.state.snapshot:
            return []  # a type we do not serve (e.g. a virtual host discovery): no answer
        sub = self._subscriptions.setdefault(type_url, _Subscription())
        first = not request.response_nonce
        if not first and request.response_nonce != sub.nonce:
            return []  # stale: answers an older response; the latest one's answer follows
        names = frozenset(request.resource_names)
        sub.wildcard = "*" in names or (type_url in WILDCARD_TYPES and not names)
        sub.names = names - {"*"}
        if not sub.wildcard:
            # Envoy drops what it no longer asks for: a name asked for again later (a
            # cluster removed and added back) must be sent again, even unchanged
            sub.sent = {name: value for name, value in sub.sent.items() if name in sub.names}
        if not first:
            if request.HasField("error_detail"):
                self._record(
                    type_url,
                    last_nack=Nack(sub.sent_version, request.error_detail.message),
                )
                # Envoy keeps its last good config; resending what it refused would loop
                return []
            self._record(type_url, version_acked=request.version_info)
        if not self.state.has_snapshot:
            return []  # answered when the first snapshot is set
        current = self.state.snapshot[type_url]
        matching = self._matching(sub, current.resources)
        if first:
            if sub.wildcard or matching:
                return [self._send(type_url, sub, current.version, matching)]
            return []
        # an ACK: answer only if the subscription now asks for something not yet given
        if self._has_news(sub, matching):
            return [self._send(type_url, sub, current.version, matching)]
        return []

    def on_push(self, steps: Iterable[PushStep]) -> list[discovery_pb2.DiscoveryResponse]:
        """A new snapshot: the responses this stream gets, in push order. A stream that
        has not subscribed to a type yet gets it when it asks."""
        steps = list(steps)
        out: list[discovery_pb2.DiscoveryResponse] = []
        rewarming: set[str] = set()
        for step in steps:
            sub = self._subscriptions.get(step.type_url)
            if sub is None or not (sub.nonce or sub.wildcard or sub.names):
                continue
            matching = self._matching(sub, step.resources)
            if step.type_url == ENDPOINT and rewarming & sub.names:
                pass  # a changed cluster waits for its endpoints, changed or not
            elif not sub.wildcard and not self._has_news(sub, matching):
                continue  # none of the resources this Envoy asked for changed
            if step.type_url == CLUSTER:
                rewarming |= {n for n, v in matching.items() if n in sub.sent and sub.sent[n] != v}
            out.append(self._send(step.type_url, sub, step.version, matching))
            if step.type_url == CLUSTER and all(st.type_url != ENDPOINT for st in steps):
                out.extend(self._rewarm_endpoints(rewarming))
        return out

    def _rewarm_endpoints(
        self, changed_clusters: set[str]
    ) -> list[discovery_pb2.DiscoveryResponse]:
        """Envoy replaces a changed cluster with a new one that warms until its EDS
        subscription gets an answer; the re-subscription names the same resources with
        the last nonce, which reads as an ACK with nothing new, so without this the
        cluster would wait for Envoy's `initial_fetch_timeout` (15 s) with its old
        settings in force. So a push that changes clusters but not endpoints resends
        the endpoints right after the clusters (one that changes endpoints too sends
        them to this stream in its own EDS step)."""
        sub = self._subscriptions.get(ENDPOINT)
        if sub is None or not sub.nonce or not (changed_clusters & sub.names):
            return []
        current = self.state.snapshot[ENDPOINT]
        return [self._send(ENDPOINT, sub, current.version, self._matching(sub, current.resources))]
