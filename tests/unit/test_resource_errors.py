"""Apply errors a user can fix in one go: every problem of a document, not only the
first msgspec meets, each with its field path, and the nearest kind or field name
for a typo."""

from __future__ import annotations

from typing import Any

from mesh.messages import ResourceDocument
from mesh.resources import parse_documents
from mesh.resources.decode import nearest


def errors_of(body: dict[str, Any]) -> list[str]:
    batch = parse_documents([ResourceDocument(source="f.yaml", index=0, body=body)])
    assert batch.resources == []
    return [str(e) for e in batch.errors]


def vs(spec: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "reviews"},
        "spec": spec,
        **top,
    }


def test_every_error_of_a_document_is_reported_with_the_nearest_name() -> None:
    body = vs(
        {
            "hosts": ["reviews"],
            "htp": [],
            "http": [
                {
                    "route": [
                        {"destination": {"host": "reviews", "subsett": "v1"}, "wieght": 10},
                        {"destination": {"host": "reviews"}, "weight": "ten"},
                    ],
                    "timout": "1s",
                }
            ],
        },
        specs={},
    )
    body["metadata"] = {"name": "reviews", "labls": {"a": "b"}}
    assert errors_of(body) == [
        "f.yaml: document 0: specs is not supported (did you mean spec?)",
        "f.yaml: document 0: metadata.labls is not supported (did you mean labels?)",
        "f.yaml: document 0: spec.htp is not supported (did you mean http?)",
        "f.yaml: document 0: spec.http[0].route[0].destination.subsett is not supported "
        "(did you mean subset?)",
        "f.yaml: document 0: spec.http[0].route[0].wieght is not supported (did you mean weight?)",
        "f.yaml: document 0: spec.http[0].route[1].weight: must be an integer, got a string",
        "f.yaml: document 0: spec.http[0].timout is not supported (did you mean timeout?)",
    ]


def test_a_wrong_type_on_a_required_field_is_said_once() -> None:
    # `hosts` removed after its error must not come back as "spec.hosts is required"
    assert errors_of(vs({"hosts": "reviews", "htp": []})) == [
        "f.yaml: document 0: spec.hosts: must be a list, got a string",
        "f.yaml: document 0: spec.htp is not supported (did you mean http?)",
    ]


def test_a_misspelt_kind_gets_the_nearest_kind() -> None:
    body = vs({"hosts": ["reviews"]})
    body["kind"] = "VirtualServce"
    assert errors_of(body) == [
        "f.yaml: document 0: kind VirtualServce is not supported (did you mean VirtualService?)"
    ]
    body["kind"] = "AuthorisationPolicy"
    assert errors_of(body)[0].endswith("(did you mean AuthorizationPolicy?)")


def test_no_suggestion_when_nothing_is_close() -> None:
    assert nearest("zzzz", ["http", "tcp", "hosts"]) == ""
    body = vs({"hosts": ["reviews"], "corsPolicy": {}})
    assert errors_of(body) == ["f.yaml: document 0: spec.corsPolicy is not supported"]
