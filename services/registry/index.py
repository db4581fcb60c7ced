"""Pure registry state: instance records keyed like etcd, folded into endpoint sets.

The leader feeds it the initial listing and then watch events; it answers which
services changed, and builds the `EndpointSet` to publish for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from mesh.messages import Endpoint, EndpointSet, Instance

_decode_instance = msgspec.msgpack.Decoder(Instance).decode


def instance_key(prefix: str, namespace: str, service: str, instance: str) -> str:
    return f"{prefix}registry/{namespace}/{service}/{instance}"


def parse_key(prefix: str, key: str) -> tuple[str, str, str] | None:
    """`/mesh/registry/ns/svc/inst` -> (ns, svc, inst)."""
    base = f"{prefix}registry/"
    if not key.startswith(base):
        return None
    parts = key[len(base) :].split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def endpoint_of(inst: Instance) -> Endpoint:
    return Endpoint(
        instance=inst.instance,
        address=inst.address,
        labels=inst.labels,
        identity=inst.identity,
        version=inst.version,
        tcp_ports=inst.tcp_ports,
        tcp_listeners=inst.tcp_listeners,
        plain_tcp_ports=inst.plain_tcp_ports,
        status=inst.status,
        admin=inst.admin,
    )


def decode_instance(value: bytes) -> Instance | None:
    try:
        return _decode_instance(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass
class EndpointIndex:
    prefix: str
    # (ns, svc) -> instance id -> Instance
    services: dict[tuple[str, str], dict[str, Instance]] = field(default_factory=dict)
    # (ns, svc) -> revision of the last change applied
    revisions: dict[tuple[str, str], int] = field(default_factory=dict)

    def load(self, records: list[tuple[str, bytes]], revision: int) -> set[tuple[str, str]]:
        """Replace the state with a full listing taken at `revision`."""
        before = set(self.services)
        self.services.clear()
        for key, value in records:
            self._put(key, value, revision)
        changed = before | set(self.services)
        for svc in changed:
            self.revisions[svc] = revision
        return changed

    def apply(self, kind: str, key: str, value: bytes, revision: int) -> tuple[str, str] | None:
        """Apply one watch event; return the service it changed, if any."""
        parsed = parse_key(self.prefix, key)
        if parsed is None:
            return None
        ns, svc, inst = parsed
        if kind == "put":
            if not self._put(key, value, revision):
                return None
        else:
            members = self.services.get((ns, svc))
            if members is None or members.pop(inst, None) is None:
                return None
            if not members:
                del self.services[(ns, svc)]
        self.revisions[(ns, svc)] = revision
        return ns, svc

    def _put(self, key: str, value: bytes, revision: int) -> bool:
        parsed = parse_key(self.prefix, key)
        inst = decode_instance(value)
        if parsed is None or inst is None:
            return False
        ns, svc, inst_id = parsed
        self.services.setdefault((ns, svc), {})[inst_id] = inst
        return True

    def endpoint_set(self, namespace: str, service: str, prev_revision: int = 0) -> EndpointSet:
        members = self.services.get((namespace, service), {})
        return EndpointSet(
            namespace=namespace,
            service=service,
            revision=self.revisions.get((namespace, service), 0),
            endpoints=[endpoint_of(members[k]) for k in sorted(members)],
            prev_revision=prev_revision,
        )


def sets_from_listing(
    prefix: str, records: list[tuple[str, bytes, int]], revision: int
) -> list[EndpointSet]:
    """Endpoint sets from a point-in-time listing (key, value, mod_revision).

    A set's revision is the listing revision: the state it reflects."""
    grouped: dict[tuple[str, str], list[Instance]] = {}
    for key, value, _mod in records:
        parsed = parse_key(prefix, key)
        inst = decode_instance(value)
        if parsed is None or inst is None:
            continue
        grouped.setdefault((parsed[0], parsed[1]), []).append(inst)
    return [
        EndpointSet(
            namespace=ns,
            service=svc,
            revision=revision,
            endpoints=[endpoint_of(i) for i in sorted(insts, key=lambda i: i.instance)],
        )
        for (ns, svc), insts in sorted(grouped.items())
    ]
