"""The decisions of an incremental (delta) xDS server, without sockets.

Used for the virtual hosts Envoy asks for on demand (VHDS, architecture §5.2), and by
`DeltaAggregatedResources` for any type the server holds. `DeltaState` holds the
resources the server has per type (each with a content version and the names it is
known by), and the names it knows do not exist; `DeltaStream` is one Envoy's stream:
its `DeltaDiscoveryRequest`s and the state's changes in, `DeltaDiscoveryResponse`s
out. The gRPC shell (`proxy.envoy.xds_server`) only moves messages.

Protocol rules followed (Envoy's xDS protocol document, "Incremental xDS"):

- a request subscribes (`resource_names_subscribe`, `*` = wildcard) and unsubscribes
  by name; a subscribed name may be a resource's name or one of its aliases (VHDS asks
  for `<route configuration>/<host>`, answered by the virtual host whose domains cover
  the host, the alias listed in the resource's `aliases`);
- the first request of a type is always answered (possibly with nothing: Envoy waits
  for that answer before it uses what depends on the type), once the type has been
  set; naming nothing, it is a wildcard subscription, except for VHDS;
- the first request of a type may list `initial_resource_versions` (an Envoy that
  reconnected): those are not resent unless their version differs;
- a response carries only what changed for the stream: added or updated resources
  (version = content digest) and `removed_resources` (a subscribed resource the server
  no longer has), a unique nonce and the server's `system_version_info`;
- a name the server resolved as not existing is answered: for VHDS as a resource
  with that name as its alias and no body (Envoy resumes the held request, which gets
  404 `NR`), for other types in `removed_resources`. Envoy subscribes to such a name
  again on the next request for that host: it is then unresolved until the caller
  sets the type again (it may exist by now), and answered from that state;
- a resource the Envoy has and the server does not is removed only once no subscribed
  name waits for an answer (after a sidecar restart the new server learns the names
  again first: removing them meanwhile would fail the held requests);
- a request with a nonce and no `error_detail` ACKs that response; with `error_detail`
  it NACKs it: Envoy keeps what it had, we record its message and do not resend the
  refused versions until they change (resending would loop);
- an unsubscribed resource is forgotten for the stream (Envoy drops it itself).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from proxy.envoy.ads_protocol import Nack, XdsError
from proxy.envoy.resources import VIRTUAL_HOST

# types whose "does not exist" answer is an empty resource naming the alias (VHDS)
ABSENT_AS_EMPTY_RESOURCE = frozenset({VIRTUAL_HOST})
# types only ever asked for by name: a first request naming nothing is no wildcard
# (VHDS opens its stream with an empty request and waits for an answer)
NAMED_ONLY = frozenset({VIRTUAL_HOST})
WILDCARD = "*"


@dataclass(frozen=True)
class DeltaResource:
    name: str
    value: bytes  # serialized deterministically
    aliases: frozenset[str] = frozenset()

    @property
    def version(self) -> str:
        return hashlib.sha256(self.value).hexdigest()[:16]


def delta_resource(message: Message, aliases: Iterable[str] = ()) -> DeltaResource:
    """A resource named by its own `name` (for VHDS, `<route configuration>/<vhost>`)."""
    name = getattr(message, "name", "")
    if not name:
        raise XdsError(f"a {message.DESCRIPTOR.full_name} without a name cannot be served")
    return DeltaResource(name, message.SerializeToString(deterministic=True), frozenset(aliases))


@dataclass(frozen=True)
class TypeResources:
    """What the server has for one type: resources by name and the names (or aliases)
    it knows do not exist."""

    resources: Mapping[str, DeltaResource] = field(default_factory=dict)
    absent: frozenset[str] = frozenset()
    # answered as not existing in every stream's first response of a named-only type:
    # Envoy's VHDS watches its route configuration's namespace and finishes its
    # initialisation only when a response names something in it (`<route config>/`)
    opening: frozenset[str] = frozenset()

    def resolve(self, requested: str) -> DeltaResource | None:
        found = self.resources.get(requested)
        if found is not None:
            return found
        return next((r for r in self.resources.values() if requested in r.aliases), None)


class DeltaState:
    """The resources served to every delta stream, per type URL."""

    def __init__(self) -> None:
        self.types: dict[str, TypeResources] = {}
        self._versions = itertools.count(1)
        self.system_version = ""
        # bumped by every `set`, changed or not: names re-asked before it are answered
        self.generation = 0

    def set(
        self,
        type_url: str,
        resources: Iterable[DeltaResource],
        absent: Iterable[str] = (),
        opening: Iterable[str] = (),
    ) -> bool:
        """Make these the type's resources; whether anything changed. Streams must be
        told (`DeltaStream.on_change`) even when nothing changed: a name re-asked
        meanwhile waits for this answer."""
        self.generation += 1
        new = TypeResources({r.name: r for r in resources}, frozenset(absent), frozenset(opening))
        if self.types.get(type_url) == new:
            return False
        self.types[type_url] = new
        self.system_version = str(next(self._versions))
        return True


ABSENT = ""  # what `_Subscription.answered` records for a name answered as not existing


@dataclass
class _Subscription:
    names: set[str] = field(default_factory=set)
    wildcard: bool = False
    # resource name -> the version this Envoy has (sent, or listed on reconnect)
    has: dict[str, str] = field(default_factory=dict)
    # subscribed name -> the version it was answered with (ABSENT: "does not exist")
    answered: dict[str, str] = field(default_factory=dict)
    # nonce -> the resource versions that response carried (until ACKed or NACKed)
    in_flight: dict[str, dict[str, str]] = field(default_factory=dict)
    answered_first: bool = False
    # names answered absent and subscribed again -> the state generation then
    recheck: dict[str, int] = field(default_factory=dict)


class DeltaStream:
    """One Envoy's delta stream. `last_nack` per type: Envoy's last refusal;
    `acked` per type: how many responses Envoy ACKed."""

    def __init__(self, state: DeltaState, stream_id: int = 0):
        self.state = state
        self.stream_id = stream_id
        self.node_id = ""
        self._subscriptions: dict[str, _Subscription] = {}
        self._nonces = itertools.count(1)
        self.last_nack: dict[str, Nack] = {}
        self.acked: dict[str, int] = {}

    def unresolved(self, type_url: str) -> set[str]:
        """Subscribed names the state neither has nor knows to be absent: the caller
        must find out (and `set` the type again), the request waits until then."""
        sub = self._subscriptions.get(type_url)
        held = self.state.types.get(type_url, TypeResources())
        if sub is None:
            return set()
        return {
            n
            for n in sub.names
            if held.resolve(n) is None and (n not in held.absent or self._rechecking(sub, n))
        }

    def _rechecking(self, sub: _Subscription, name: str) -> bool:
        return sub.recheck.get(name) == self.state.generation

    def on_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        if request.node.id:
            self.node_id = request.node.id
        type_url = request.type_url
        sub = self._subscriptions.get(type_url)
        if sub is None:
            sub = self._subscriptions[type_url] = _Subscription()
            sub.has = dict(request.initial_resource_versions)
            # a first request that names nothing is a wildcard subscription
            sub.wildcard = not request.resource_names_subscribe and type_url not in NAMED_ONLY
        if request.response_nonce:
            carried = sub.in_flight.pop(request.response_nonce, None)
            if carried is not None and request.HasField("error_detail"):
                self.last_nack[type_url] = Nack(
                    self.state.system_version, request.error_detail.message
                )
            elif carried is not None:
                self.acked[type_url] = self.acked.get(type_url, 0) + 1
        for name in request.resource_names_subscribe:
            if name == WILDCARD:
                sub.wildcard = True
                continue
            if sub.answered.get(name) == ABSENT:
                # asked again (a new request for that host): look again
                del sub.answered[name]
                sub.recheck[name] = self.state.generation
            sub.names.add(name)
        for name in request.resource_names_unsubscribe:
            if name == WILDCARD:
                sub.wildcard = False
                continue
            sub.names.discard(name)
            sub.answered.pop(name, None)
        self._forget_unsubscribed(type_url, sub)
        return self._updates(type_url, sub)

    def on_change(
        self, type_urls: Iterable[str] | None = None
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        """The state changed: what this stream must be told, type by type."""
        out: list[discovery_pb2.DeltaDiscoveryResponse] = []
        for type_url, sub in self._subscriptions.items():
            if type_urls is None or type_url in type_urls:
                out.extend(self._updates(type_url, sub))
        return out

    def _forget_unsubscribed(self, type_url: str, sub: _Subscription) -> None:
        if sub.wildcard:
            return
        held = self.state.types.get(type_url, TypeResources())
        wanted = {r.name for n in sub.names if (r := held.resolve(n)) is not None}
        for name in list(sub.has):
            if name not in wanted and name not in sub.names:
                del sub.has[name]

    def _updates(
        self, type_url: str, sub: _Subscription
    ) -> list[discovery_pb2.DeltaDiscoveryResponse]:
        held = self.state.types.get(type_url)
        if held is None:
            return []  # nothing set for this type yet: answered when it is
        added: dict[str, discovery_pb2.Resource] = {}
        removed: list[str] = []
        # resources a subscribed name (or the wildcard) covers
        covered: dict[str, set[str]] = {}
        if sub.wildcard:
            covered.update({name: set() for name in held.resources})
        for requested in sorted(sub.names):
            resource = held.resolve(requested)
            if resource is not None:
                aliases = covered.setdefault(resource.name, set())
                if requested != resource.name:
                    aliases.add(requested)
                if sub.answered.get(requested) != resource.version:
                    sub.answered[requested] = resource.version
                    sub.has.pop(resource.name, None)  # resend: this alias waits for it
            elif (
                requested in held.absent
                and sub.answered.get(requested) != ABSENT
                and not self._rechecking(sub, requested)
            ):
                sub.answered[requested] = ABSENT
                sub.recheck.pop(requested, None)
                if type_url in ABSENT_AS_EMPTY_RESOURCE:
                    added[requested] = discovery_pb2.Resource(name=requested, aliases=[requested])
                elif requested in sub.has:
                    removed.append(requested)
                    del sub.has[requested]
                else:
                    removed.append(requested)
        for name, aliases in sorted(covered.items()):
            resource = held.resources[name]
            if sub.has.get(name) == resource.version:
                continue
            added[name] = discovery_pb2.Resource(
                name=name,
                version=resource.version,
                aliases=sorted(aliases),
                resource=any_pb2.Any(type_url=type_url, value=resource.value),
            )
        opening = held.opening if not sub.answered_first and type_url in NAMED_ONLY else set()
        # while a subscribed name is unresolved, what the Envoy has may be its answer (a
        # reconnected Envoy lists it in `initial_resource_versions` before the server
        # knows it again): removed only once every subscribed name is resolved
        resolving = bool(self.unresolved(type_url))
        for name in sorted(sub.has):
            if name in held.resources or name in added or name in opening:
                continue
            if not resolving:
                removed.append(name)  # the server no longer has it
        for name in sorted(opening - added.keys()):
            added[name] = discovery_pb2.Resource(name=name, aliases=[name])
            sub.has.pop(name, None)  # a name with no body: nothing the Envoy keeps
        if not added and not removed and sub.answered_first:
            return []
        sub.answered_first = True
        nonce = f"{self.stream_id}-{next(self._nonces)}"
        carried: dict[str, str] = {}
        for name, resource in added.items():
            if resource.HasField("resource"):
                sub.has[name] = resource.version
                carried[name] = resource.version
        for name in removed:
            sub.has.pop(name, None)
        sub.in_flight[nonce] = carried
        return [
            discovery_pb2.DeltaDiscoveryResponse(
                system_version_info=self.state.system_version,
                type_url=type_url,
                nonce=nonce,
                resources=list(added.values()),
                removed_resources=sorted(set(removed)),
            )
        ]
