"""OTLP/JSON (`--otlp-protocol http/json`), the pure part: an OTLP protobuf message
as the JSON that OTLP/HTTP accepts with `Content-Type: application/json`.

OTLP/JSON is protobuf's JSON mapping with three differences that a plain
`MessageToDict` gets wrong: trace and span ids are hex strings (not base64), enums are
integers, and keys use the field names of the current proto. The messages may come
from the older proto copy (see otlp.py), whose "instrumentation library" fields are
renamed to their current "scope" names here.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

# keys holding ids, base64 in protobuf's JSON mapping, hex in OTLP/JSON
_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId"})
# the older proto's names for the scope fields
_RENAMED = {
    "instrumentationLibrarySpans": "scopeSpans",
    "instrumentationLibraryMetrics": "scopeMetrics",
    "instrumentationLibraryLogs": "scopeLogs",
    "instrumentationLibrary": "scope",
}


def _fix(node: Any) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in _ID_KEYS and isinstance(value, str):
                out[key] = base64.b64decode(value).hex()
            else:
                name = _RENAMED.get(str(key), str(key))
                out[name] = _fix(value)
        return out
    if isinstance(node, list):
        return [_fix(v) for v in node]
    return node


def to_otlp_json(message: Message) -> bytes:
    data = MessageToDict(message, preserving_proto_field_name=False, use_integers_for_enums=True)
    return json.dumps(_fix(data), separators=(",", ":")).encode()


__all__ = ["to_otlp_json"]
