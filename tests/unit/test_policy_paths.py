"""Request-target normalisation (proxy.policy.paths): what authorization sees and the
app receives, so path tricks cannot slip past a policy on `/admin`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.errors import BadRequest
from proxy.policy import PathError, normalize_path


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        # unchanged (fast path)
        ("/", "/"),
        ("/admin", "/admin"),
        ("/api/v1/items/", "/api/v1/items/"),
        ("/a?b=c", "/a?b=c"),
        ("/file.txt", "/file.txt"),
        ("/a..b/c", "/a..b/c"),
        # repeated slashes merged
        ("//admin", "/admin"),
        ("//a///b", "/a/b"),
        ("/a//", "/a/"),
        ("///", "/"),
        # dot segments (RFC 3986 §5.2.4)
        ("/./admin", "/admin"),
        ("/a/../admin", "/admin"),
        ("/a/./b/../c", "/a/c"),
        ("/..", "/"),
        ("/../../admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a/b/../", "/a/"),
        ("/.well-known/x", "/.well-known/x"),
        ("/a/.../b", "/a/.../b"),
        # Envoy order: dots first (`..` pops the empty segment), then merge
        ("/a//../b", "/a/b"),
        # percent-decoding of unreserved characters, upper-cased hex for the rest
        ("/%61dmin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/%2E%2e/x", "/x"),
        ("/a/%2e/b", "/a/b"),
        ("/public/%2e%2E/admin", "/admin"),
        ("/%7e/%7E", "/~/~"),
        ("/a%3ab", "/a%3Ab"),
        ("/a%3Ab", "/a%3Ab"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/%252F", "/%252F"),
        ("/a%20b", "/a%20b"),
        # the query is split off and kept exactly as sent
        ("/a?b=%2F", "/a?b=%2F"),
        ("//a/./b?x=//y/../%2f&z=\\", "/a/b?x=//y/../%2f&z=\\"),
        ("/%61?%61", "/a?%61"),
        ("/a?", "/a?"),
    ],
)
def test_normalize_path(target: str, expected: str) -> None:
    assert normalize_path(target) == expected


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("/admin%2F..", "encoded slash"),
        ("/admin%2f", "encoded slash"),
        ("/admin%5c", "backslash"),
        ("/admin%5C", "backslash"),
        ("/a\\b", "backslash"),
        ("/a\x00b", "NUL"),
        ("/a%00b", "NUL"),
        ("admin", "must start with '/'"),
        ("", "must start with '/'"),
        ("*", "must start with '/'"),
        ("http://host/a", "must start with '/'"),
        ("?a=b", "must start with '/'"),
        ("/a%zz", "malformed percent-encoding"),
        ("/a%4", "malformed percent-encoding"),
        ("/a%", "malformed percent-encoding"),
        ("/a#frag", "fragment"),
        ("/a?b#frag", "fragment"),
    ],
)
def test_rejected_targets(target: str, message: str) -> None:
    with pytest.raises(PathError, match=message) as raised:
        normalize_path(target)
    # answered 400 at the boundary like every BadRequest
    assert isinstance(raised.value, BadRequest)
    assert raised.value.code == 400


@pytest.mark.parametrize("target", ["/", "/admin", "/a/b.c?x=%2F//..", "/api/v1/"])
def test_fast_path_returns_the_same_object(target: str) -> None:
    assert normalize_path(target) is target


# Paths built from the pieces that matter (slashes, dots, escapes), so that most
# examples are valid and the properties are exercised, not the rejections.
_PIECES = st.sampled_from(
    ["/", "//", ".", "..", "a", "b", "~", "%2e", "%2E", "%2f", "%5C", "%61", "%3a", "%7e", "%25"]
)
_PATHS = st.lists(_PIECES, max_size=12).map(lambda parts: "/" + "".join(parts))
_QUERIES = st.sampled_from(["", "?", "?a=%2F//..", "?x=/./"])


def _normalize_or_none(target: str) -> str | None:
    try:
        return normalize_path(target)
    except PathError:
        return None


@given(_PATHS, _QUERIES)
def test_normalize_is_idempotent(path: str, query: str) -> None:
    once = _normalize_or_none(path + query)
    if once is not None:
        assert normalize_path(once) == once


@given(_PATHS, _QUERIES)
def test_normalized_path_has_no_empty_or_dot_segments_nor_encoded_slash(
    path: str, query: str
) -> None:
    result = _normalize_or_none(path + query)
    if result is None:
        return
    normalized, _, rest = result.partition("?")
    assert rest == query[1:]  # the query is untouched
    assert normalized.startswith("/")
    assert "//" not in normalized
    assert "/./" not in normalized and "/../" not in normalized
    assert not normalized.endswith(("/.", "/.."))
    assert "%2F" not in normalized.upper() and "%5C" not in normalized.upper()


@given(st.text(max_size=30))
def test_arbitrary_text_either_normalizes_or_raises_path_error(target: str) -> None:
    result = _normalize_or_none(target)
    if result is not None:
        assert result.startswith("/")
        assert normalize_path(result) == result
