"""YAML text -> documents -> validated `Resource`s, with errors that name file, document and field.

Two entry points because documents arrive two ways: `meshctl apply -f` reads YAML
(`load_yaml`), the config service receives already-parsed documents over the bus
(`parse_resource` / `parse_documents`). Both run the same checks.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from typing import Any, NamedTuple, Protocol

import msgspec
import yaml

from mesh.resources.decode import decode_all, nearest
from mesh.resources.errors import Issue, ResourceError, required, unsupported
from mesh.resources.model import Metadata, Resource
from mesh.resources.registry import KINDS, registry_kind, resolve_kind
from mesh.resources.validate import validate_metadata

_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec")


class SourcedDocument(Protocol):
    """A document with its origin; `mesh.messages.ResourceDocument` is one."""

    @property
    def source(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def body(self) -> dict[str, Any]: ...


class ParsedBatch(NamedTuple):
    resources: list[Resource]
    # every problem of every document; `resources` holds only the valid documents
    errors: list[ResourceError]


# ---------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys, which PyYAML would resolve silently
    by keeping the last one (a second `route:` would quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are allowed to be overridden
            name = self.construct_object(key_node, deep=True)
            if isinstance(name, Hashable):
                if name in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {name!r}",
                        key_node.start_mark,
                    )
                seen.add(name)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, source: str) -> list[dict[str, Any]]:
    """The resource documents in multi-document YAML `text`, in order.

    Empty documents are skipped and `kind: List` documents are replaced by their
    `items`, so the position of a document in the result is the `index` to report.
    """
    documents: list[dict[str, Any]] = []
    try:
        for doc in yaml.load_all(text, Loader=_StrictLoader):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ResourceError(_not_a_mapping(doc), source=source, index=len(documents))
            if doc.get("kind") == "List":
                documents.extend(_list_items(doc, source, len(documents)))
            else:
                documents.append(doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        raise ResourceError(
            f"invalid YAML: {problem}",
            source=source,
            index=len(documents),
            line=mark.line + 1 if mark is not None else None,
        ) from exc
    except yaml.YAMLError as exc:
        raise ResourceError(f"invalid YAML: {exc}", source=source, index=len(documents)) from exc
    return documents


def _list_items(doc: dict[str, Any], source: str, index: int) -> list[dict[str, Any]]:
    items = doc.get("items")
    if not isinstance(items, list):
        raise ResourceError("must be a list of resources", source=source, index=index, path="items")
    for i, entry in enumerate(items):
        if not isinstance(entry, dict):
            raise ResourceError(_not_a_mapping(entry), source=source, index=index + i)
    return items


def _not_a_mapping(doc: object) -> str:
    return (
        "document must be a mapping with apiVersion, kind, metadata and spec, "
        f"got {type(doc).__name__}"
    )


# ---------------------------------------------------------------- documents


def parse_resource(
    body: Mapping[str, Any], *, source: str, index: int, default_namespace: str = "default"
) -> Resource:
    """Validate one document; raises the first `ResourceError` found in it."""
    resource, issues = _parse(body, default_namespace)
    if issues or resource is None:
        first = issues[0] if issues else Issue("", "invalid document")
        raise ResourceError.from_issue(first, source=source, index=index)
    return resource


def parse_documents(
    documents: Iterable[SourcedDocument], *, default_namespace: str = "default"
) -> ParsedBatch:
    """Validate a batch, collecting every error of every document (for one apply reply).

    Structural errors (wrong type, unknown field) stop a document at the first one, as
    msgspec does; semantic errors of a well-formed document are all reported.
    """
    resources: list[Resource] = []
    errors: list[ResourceError] = []
    for doc in documents:
        resource, issues = _parse(doc.body, default_namespace)
        errors.extend(
            ResourceError.from_issue(i, source=doc.source, index=doc.index) for i in issues
        )
        if resource is not None and not issues:
            resources.append(resource)
    return ParsedBatch(resources, errors)


def _parse(body: Any, default_namespace: str) -> tuple[Resource | None, list[Issue]]:
    if not isinstance(body, Mapping):
        return None, [Issue("", _not_a_mapping(body))]
    issues = [_unknown_top_level(str(k)) for k in body if k not in _TOP_LEVEL]
    kind = body.get("kind")
    if kind is None:
        return None, [*issues, required("kind")]
    if isinstance(kind, str):
        kind = registry_kind(kind, body.get("apiVersion"))
    if not isinstance(kind, str) or kind not in KINDS:
        return None, [*issues, Issue("kind", f"kind {kind} is not supported{_kind_hint(kind)}")]
    info = KINDS[kind]
    api_version = body.get("apiVersion")
    if api_version is None:
        issues.append(required("apiVersion"))
    elif api_version not in info.api_versions:
        foreign = _same_name_other_api(kind, api_version, info.api_versions)
        if foreign is not None:
            # another API's kind of the same name: its spec would only add noise
            return None, [*issues, foreign]
        issues.append(
            Issue(
                "apiVersion",
                f"apiVersion {api_version} is not supported for kind {kind} "
                f"(use {_one_of(info.api_versions)})",
            )
        )
    metadata = _decode_metadata(body.get("metadata"), default_namespace, issues)
    if metadata is not None and info.validate_metadata is not None:
        issues.extend(info.validate_metadata(metadata, "metadata"))
    spec: Any = None
    if "spec" not in body:
        issues.append(required("spec"))
    else:
        spec = decode_all(body["spec"], info.spec_type, "spec")
        if isinstance(spec, list):
            issues.extend(spec)
            spec = None
        else:
            issues.extend(info.validate(spec, "spec"))
    if issues or metadata is None or spec is None:
        return None, issues
    return Resource(api_version=str(api_version), kind=kind, metadata=metadata, spec=spec), []


def _decode_metadata(raw: Any, default_namespace: str, issues: list[Issue]) -> Metadata | None:
    if raw is None:
        issues.append(required("metadata.name"))
        return None
    metadata = decode_all(raw, Metadata, "metadata")
    if isinstance(metadata, list):
        issues.extend(metadata)
        return None
    if not metadata.namespace:
        metadata = msgspec.structs.replace(metadata, namespace=default_namespace)
    issues.extend(validate_metadata(metadata))
    return metadata


# API groups whose kinds share a name with ours but are other resources
_OTHER_APIS = {"gateway.networking.k8s.io": "the Kubernetes Gateway API"}


def _same_name_other_api(kind: str, api_version: object, ours: tuple[str, ...]) -> Issue | None:
    """`Gateway` of `gateway.networking.k8s.io/v1` is not Istio's `Gateway` with another
    version: say which resource it is, rather than suggesting a version change."""
    group = str(api_version).partition("/")[0]
    api = _OTHER_APIS.get(group)
    if api is None or any(v.partition("/")[0] == group for v in ours):
        return None  # the kind is of that API: only its version is wrong
    return Issue(
        "apiVersion",
        f"kind {kind} of {api} ({api_version}) is not supported; this {kind} is "
        f"Istio's ({_one_of(ours)}), a different resource with its own spec",
    )


def _kind_hint(kind: object) -> str:
    if not isinstance(kind, str):
        return ""
    try:
        canonical = resolve_kind(kind)
    except ResourceError:
        canonical = nearest(kind, list(KINDS))  # a typo: VirtualServce
        if canonical and kind.startswith(canonical):
            canonical = ""  # another kind with a longer name (ServiceEntry), not a typo
    return f" (did you mean {canonical}?)" if canonical else ""


def _unknown_top_level(name: str) -> Issue:
    issue = unsupported(name)
    hint = nearest(name, list(_TOP_LEVEL))
    return Issue(issue.path, f"{issue.message} (did you mean {hint}?)") if hint else issue


def _one_of(values: tuple[str, ...]) -> str:
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
