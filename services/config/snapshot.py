"""Pure state of the config service: the resources in force, in creation order.

Every replica keeps one, loaded from etcd and followed with a watch; fetches are
compiled from it and the leader publishes from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from mesh.resources import Resource, ResourceError, parse_resource

RESOURCES = "resources"


def resource_key(prefix: str, kind: str, namespace: str, name: str) -> str:
    return f"{prefix}{RESOURCES}/{kind}/{namespace}/{name}"


def change_marker_key(prefix: str) -> str:
    """Written in the same transaction as every apply and delete: the revision of the
    last change to the resources, deletes included, read back by every replica alike."""
    return f"{prefix}{RESOURCES}/.changed"


def parse_resource_key(prefix: str, key: str) -> tuple[str, str, str] | None:
    base = f"{prefix}{RESOURCES}/"
    if not key.startswith(base):
        return None
    parts = key[len(base) :].split("/")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True, slots=True)
class StoredEntry:
    resource: Resource
    create_revision: int
    mod_revision: int


def decode_stored(key: str, value: bytes) -> Resource | None:
    """A stored resource was validated when applied; one that no longer parses (written
    by hand, or by another version) is skipped rather than breaking every destination."""
    try:
        return parse_resource(json.loads(value), source=key, index=0)
    except (ResourceError, ValueError):
        return None


@dataclass
class ResourceSnapshot:
    prefix: str
    # the revision of the last change to the resources (the same on every replica that
    # has seen it: compiled config carries it, and proxy-status compares it)
    revision: int = 0
    # where a watch resumes: the store revision the listing was read at, or any later
    # event's
    watch_revision: int = 0
    entries: dict[tuple[str, str, str], StoredEntry] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def load(self, records: list[tuple[str, bytes, int, int]], revision: int) -> None:
        """Replace everything with a listing: (key, value, create_revision, mod_revision)."""
        self.entries.clear()
        self.skipped.clear()
        self.revision = 0
        for key, value, create, mod in records:
            self.put(key, value, create, mod)
        # 1 for an empty store: compiled config always carries a revision above 0
        self.revision = max(self.revision, 1)
        self.watch_revision = revision

    def put(self, key: str, value: bytes, create_revision: int, mod_revision: int) -> bool:
        self.watch_revision = max(self.watch_revision, mod_revision)
        if key == change_marker_key(self.prefix):
            self.revision = max(self.revision, mod_revision)
            return False
        ref = parse_resource_key(self.prefix, key)
        if ref is None:
            return False
        resource = decode_stored(key, value)
        if resource is None:
            self.skipped[key] = "stored resource does not validate"
            self.entries.pop(ref, None)
            return True
        self.skipped.pop(key, None)
        self.entries[ref] = StoredEntry(resource, create_revision, mod_revision)
        self.revision = max(self.revision, mod_revision)
        return True

    def delete(self, key: str, revision: int) -> bool:
        self.watch_revision = max(self.watch_revision, revision)
        ref = parse_resource_key(self.prefix, key)
        if ref is None:
            return False
        self.skipped.pop(key, None)
        self.revision = max(self.revision, revision)
        return self.entries.pop(ref, None) is not None

    def create_revisions(self) -> dict[tuple[str, str, str], int]:
        """(kind, namespace, name) -> the etcd revision that created the resource (Istio
        breaks ties between equally specific policies by creation time)."""
        return {ref: entry.create_revision for ref, entry in self.entries.items()}

    def resources(self) -> list[Resource]:
        """In creation order (oldest first), as the compiler expects."""
        ordered = sorted(self.entries.values(), key=lambda e: (e.create_revision, e.resource.ref))
        return [e.resource for e in ordered]
