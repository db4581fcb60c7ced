"""Istio StringMatch -> Envoy matchers (route match, header and query matchers)."""

from __future__ import annotations

import re

from mesh.compiled import StringMatch

from .protos import Json


def string_matcher(sm: StringMatch, *, ignore_case: bool = False) -> Json:
    """An Envoy StringMatcher. Istio regexes are RE2 full matches, as Envoy's are."""
    if sm.kind == "exact":
        out: Json = {"exact": sm.value}
    elif sm.kind == "prefix":
        out = {"prefix": sm.value}
    else:
        out = {"safeRegex": {"regex": sm.value}}
    if ignore_case and sm.kind != "regex":
        out["ignoreCase"] = True
    return out


def header_matcher(name: str, sm: StringMatch) -> Json:
    return {"name": name, "stringMatch": string_matcher(sm)}


def without_header_matcher(name: str, sm: StringMatch) -> Json:
    """`withoutHeaders`: the request must not carry a matching value. An absent header
    passes (the Python proxy's rule), so a missing header is compared as "" and the
    result inverted. Istio's `regex: "*"` means "the header is present"."""
    if sm.kind == "regex" and sm.value == "*":
        return {"name": name, "presentMatch": True, "invertMatch": True}
    return {
        "name": name,
        "stringMatch": string_matcher(sm),
        "invertMatch": True,
        "treatMissingHeaderAsEmpty": True,
    }


def authority_matcher(sm: StringMatch) -> Json:
    """`authority`: compared with the Host as sent, and again without its port (the
    Python proxy's second chance, so `exact: reviews` matches `reviews:9080`)."""
    if sm.kind == "prefix":
        # whatever the port, `host:port` starts with the prefix when `host` does
        return header_matcher(":authority", sm)
    pattern = re.escape(sm.value) if sm.kind == "exact" else f"(?:{sm.value})"
    return {
        "name": ":authority",
        "stringMatch": {"safeRegex": {"regex": f"{pattern}(?::[0-9]+)?"}},
    }


def port_matcher(port: int, *, default: bool = False) -> Json:
    """A match's `port`: the port the Host names, as the Python proxy reads it from the
    authority; a Host without a port matches only when `port` is the default port
    where the route applies (`default`: 80 at a gateway or for a ServiceEntry host)."""
    if default:
        return {
            "name": ":authority",
            "stringMatch": {"safeRegex": {"regex": rf"(\[[^\]]*\]|[^:\[]+)(:{port})?"}},
        }
    return {"name": ":authority", "stringMatch": {"suffix": f":{port}"}}


def query_matcher(name: str, sm: StringMatch) -> Json:
    return {"name": name, "stringMatch": string_matcher(sm)}
