"""`meshctl analyze`: Istio-style analyzers over resources and registered instances.

Pure: `analyze(context)` returns `Message`s (Istio's codes and wording where Istio has
the check). Callers build the `Context` from the live config (`mesh.config.get`), the
registry (`registry.get`) and, optionally, files not applied yet; `parse_files`
validates those with `mesh.resources`, so they fail exactly as `meshctl apply` would
(IST0106). This package imports neither `proxy/` nor `services/`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from mesh.resources import ParsedBatch, Resource, ResourceError, SourcedDocument, parse_documents

from . import networking, security
from .context import Context, Workload, build_context, workloads_of
from .messages import LEVEL_ORDER, SCHEMA_VALIDATION_ERROR, Message, ResourceName, message

Analyzer = Callable[[Context], list[Message]]

ANALYZERS: tuple[Analyzer, ...] = (
    networking.destination_references,
    networking.unreachable_rules,
    networking.conflicting_hosts,
    networking.subsets_without_instances,
    security.no_matching_workloads,
    security.denies_everything,
    security.strict_with_plaintext_callers,
    security.dry_run,
)


def analyze(ctx: Context, only: Iterable[ResourceName] | None = None) -> list[Message]:
    """Every analyzer's messages, errors first; `only` keeps those about these resources."""
    messages = [m for analyzer in ANALYZERS for m in analyzer(ctx)]
    if only is not None:
        wanted = set(only)
        messages = [m for m in messages if m.resource in wanted]
    return sorted(messages, key=lambda m: (LEVEL_ORDER[m.level], m.resource, m.code, m.text))


def overlay(live: Sequence[Resource], files: Sequence[Resource]) -> list[Resource]:
    """The live resources with the files' versions in place of (or added to) them."""
    replaced = {r.ref for r in files}
    return [r for r in live if r.ref not in replaced] + list(files)


def schema_errors(batch: ParsedBatch, documents: Sequence[SourcedDocument]) -> list[Message]:
    """IST0106 for each document that does not validate (the errors apply gives)."""
    by_position = {(d.source, d.index): d.body for d in documents}
    return [_schema_message(e, by_position.get((e.source, e.index or 0), {})) for e in batch.errors]


def _schema_message(error: ResourceError, body: object) -> Message:
    doc = body if isinstance(body, dict) else {}
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    assert isinstance(meta, dict)
    where = ResourceName(
        str(doc.get("kind") or "?"),
        str(meta.get("namespace") or "default"),
        str(meta.get("name") or f"{error.source}[{error.index}]"),
    )
    return message(SCHEMA_VALIDATION_ERROR, where, f"Schema validation error: {error}")


def parse_files(documents: Sequence[SourcedDocument]) -> tuple[list[Resource], list[Message]]:
    batch = parse_documents(documents)
    return batch.resources, schema_errors(batch, documents)


__all__ = [
    "ANALYZERS",
    "Context",
    "Message",
    "ResourceName",
    "Workload",
    "analyze",
    "build_context",
    "overlay",
    "parse_files",
    "workloads_of",
]
