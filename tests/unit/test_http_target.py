"""Request-target and Host normalisation (proxy.http.target): what routing and
authorization see and the app receives, so path and Host tricks cannot slip past a
route on `/public` or a policy on `/admin` or `admin.example.com`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.http.target import (
    InvalidTarget,
    Normalization,
    normalize_authority,
    normalize_path,
    normalize_request_target,
)
from proxy.http.wire import RequestTarget
from proxy.policy import PathError

# every option at its permissive end: what Envoy/Istio's MERGE_SLASHES does
PERMISSIVE = Normalization(
    path_parameters="keep",
    reject_invalid_utf8=False,
    reject_trailing_dot_or_space=False,
    strip_trailing_host_dot=False,
    drop_override_headers=False,
)


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
        ("/a.b/c.d", "/a.b/c.d"),
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
        # the gateway bypasses: all resolve above `/public`
        ("/public/../admin", "/admin"),
        ("/public/%2e%2e/admin", "/admin"),
        ("/public/./../admin", "/admin"),
        ("/public//../../admin", "/admin"),
        ("/public/%2E./admin", "/admin"),
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
    with pytest.raises(InvalidTarget, match=message) as raised:
        normalize_path(target)
    # the engine answers every ValueError of a request head with 400
    assert isinstance(raised.value, ValueError)
    # refused whatever the options
    with pytest.raises(InvalidTarget, match=message):
        normalize_path(target, PERMISSIVE)


def test_policy_names_are_the_engines() -> None:
    assert PathError is InvalidTarget


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


# ---------------------------------------------------------------- options ("also worth closing")


@pytest.mark.parametrize(
    ("target", "default", "permissive"),
    [
        # path parameters: refused by default; kept as Envoy does, where `..;x` is `..`
        ("/admin;x", "path parameter", "/admin;x"),
        ("/public;x/../admin", "path parameter", "/admin"),
        ("/public/..;x/admin", "path parameter", "/admin"),
        ("/a/.;x/b", "path parameter", "/a/b"),
        ("/a;jsessionid=1?q=;", "path parameter", "/a;jsessionid=1?q=;"),
        ("/a?x=;y", "/a?x=;y", "/a?x=;y"),  # in the query: not a path parameter
        ("/a/%3B", "/a/%3B", "/a/%3B"),  # encoded: data, not a delimiter
        # overlong and invalid UTF-8 in escapes
        ("/%C1%A1dmin", "not valid UTF-8", "/%C1%A1dmin"),
        ("/%C0%AE%C0%AE/admin", "not valid UTF-8", "/%C0%AE%C0%AE/admin"),
        ("/%ED%A0%80", "not valid UTF-8", "/%ED%A0%80"),  # a surrogate
        ("/%FF", "not valid UTF-8", "/%FF"),
        ("/%E2%82", "not valid UTF-8", "/%E2%82"),  # truncated sequence
        ("/caf%C3%A9", "/caf%C3%A9", "/caf%C3%A9"),
        ("/%F0%9F%98%80", "/%F0%9F%98%80", "/%F0%9F%98%80"),
        # segments ending in a dot or a space (Windows/IIS drop them)
        ("/admin.", "ending in '.' or a space", "/admin."),
        ("/admin./x", "ending in '.' or a space", "/admin./x"),
        ("/admin%2e", "ending in '.' or a space", "/admin."),
        ("/admin%20", "ending in '.' or a space", "/admin%20"),
        ("/a/.../b", "ending in '.' or a space", "/a/.../b"),
        ("/admin?x=.", "/admin?x=.", "/admin?x=."),
    ],
)
def test_options_default_refuses_what_apps_read_differently(
    target: str, default: str, permissive: str
) -> None:
    if default.startswith("/"):
        assert normalize_path(target) == default
    else:
        with pytest.raises(InvalidTarget, match=default):
            normalize_path(target)
    assert normalize_path(target, PERMISSIVE) == permissive


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("//admin", "//admin"),
        ("/a//b/", "/a//b/"),
        ("/a/./b/../c", "/a/c"),
        ("/public//../../admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/a/", "/a/"),
    ],
)
def test_without_merge_slashes_dot_segments_are_still_removed(target: str, expected: str) -> None:
    assert normalize_path(target, Normalization(merge_slashes=False)) == expected


def test_path_parameters_option_is_checked() -> None:
    with pytest.raises(ValueError, match="path_parameters"):
        Normalization(path_parameters="strip")  # type: ignore[arg-type]


# ---------------------------------------------------------------- Host


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ""),
        ("reviews", "reviews"),
        ("reviews:9080", "reviews:9080"),
        ("reviews.default.svc.cluster.local:9080", "reviews.default.svc.cluster.local:9080"),
        ("Public.Example.COM", "public.example.com"),
        ("public.example.com.", "public.example.com"),  # trailing dot stripped
        ("public.example.com.:80", "public.example.com:80"),
        ("my_svc-1", "my_svc-1"),
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]", "[::1]"),
        ("[::1]:8080", "[::1]:8080"),
        ("[FE80::1]", "[fe80::1]"),
        ("reviews:", "reviews"),  # RFC 3986 allows an empty port
    ],
)
def test_normalize_authority(value: str, expected: str) -> None:
    assert normalize_authority(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("target, client", "only letters"),
        ("target client", "only letters"),
        (">", "only letters"),
        ("*", "only letters"),
        ("a*b", "only letters"),
        ("reviews.default.>", "only letters"),
        ("user@host", "only letters"),
        ("a%2eb", "only letters"),
        ("host/path", "only letters"),
        ("h\u00e9te", "only letters"),
        ("a..b", "empty label"),
        (".a", "empty label"),
        (".", "empty label"),
        ("a.b..", "empty label"),
        (":80", "empty host name"),
        ("a:b:80", "only letters"),
        ("reviews:http", "port"),
        ("reviews:99999", "port"),
        ("reviews:123456", "port"),
        ("reviews:-1", "port"),
        ("[::1", "unterminated"),
        ("[zz::1]", "not an IPv6"),
        ("[fe80::1%eth0]", "not an IPv6"),
        ("[::1]x", "after the IPv6"),
        ("a" * 256, "too long"),
    ],
)
def test_invalid_authorities_are_refused(value: str, message: str) -> None:
    with pytest.raises(InvalidTarget, match=message) as raised:
        normalize_authority(value)
    assert str(raised.value).startswith("invalid Host")
    # the message names the problem, not the value sent
    assert value not in str(raised.value)


def test_trailing_host_dot_kept_when_asked() -> None:
    assert normalize_authority("a.example.com.", PERMISSIVE) == "a.example.com."


@pytest.mark.parametrize(
    ("method", "target", "host", "expected"),
    [
        # origin-form: the Host field is the authority
        ("GET", RequestTarget(False, "http", "Admin.Example.com", "/a/../b"), "Admin.Example.com",
         RequestTarget(False, "http", "admin.example.com", "/b")),
        # absolute-form: the URI's authority wins, the Host field is only validated
        ("GET", RequestTarget(True, "http", "public.example.com", "/echo"), "admin.example.com",
         RequestTarget(True, "http", "public.example.com", "/echo")),
        ("GET", RequestTarget(True, "http", "public.example.com.", "/x/../echo"), None,
         RequestTarget(True, "http", "public.example.com", "/echo")),
        # CONNECT: the authority is validated, there is no path
        ("CONNECT", RequestTarget(False, "http", "Example.com:443", ""), "example.com:443",
         RequestTarget(False, "http", "example.com:443", "")),
        ("OPTIONS", RequestTarget(False, "http", "a", "*"), "a",
         RequestTarget(False, "http", "a", "*")),
        ("GET", RequestTarget(False, "http", "", "/"), None, RequestTarget(False, "http", "", "/")),
    ],
)  # fmt: skip
def test_normalize_request_target(
    method: str, target: RequestTarget, host: str | None, expected: RequestTarget
) -> None:
    assert normalize_request_target(method, target, host) == expected


@pytest.mark.parametrize(
    ("method", "target", "host", "message"),
    [
        ("GET", RequestTarget(True, "http", "public.example.com", "/"), "target, client",
         "invalid Host"),
        ("GET", RequestTarget(True, "http", "a b", "/"), "a", "invalid Host"),
        ("CONNECT", RequestTarget(False, "http", ">:443", ""), ">:443", "invalid Host"),
        ("GET", RequestTarget(False, "http", "a", "/public/..;x/admin"), "a", "path parameter"),
    ],
)  # fmt: skip
def test_request_target_refusals(
    method: str, target: RequestTarget, host: str, message: str
) -> None:
    with pytest.raises(InvalidTarget, match=message):
        normalize_request_target(method, target, host)


def test_unchanged_target_is_returned_as_is() -> None:
    target = RequestTarget(False, "http", "reviews:9080", "/api/v1?x=1")
    assert normalize_request_target("GET", target, "reviews:9080") is target
