"""Request-target and Host normalisation, done once per request by the engine.

The engine builds every `Request` with `normalize_request_target`, before any handler
runs, so the outbound router, the gateway router, inbound authorization and forwarding
all see the same `Request.path` and `Request.authority`, and what was routed and
authorized is exactly what the upstream receives. Pure functions, no I/O; anything
refused raises `InvalidTarget` (a ValueError), which the engine answers with 400.

Paths (`normalize_path`), in this order:

1. the query (from the first `?`) is split off and re-appended untouched;
2. refused: a path not starting with `/`, a fragment (`#`), a raw backslash, NUL,
   space, control or non-ASCII character anywhere in the target (the query too: an
   HTTP/2 `:path` carries them verbatim, and an HTTP/1.1 request line cannot, so they
   would otherwise pass routing and authorization and fail only at the upstream
   encoder; Envoy refuses them as well), a malformed escape (`%zz`, a trailing `%`),
   an encoded slash, backslash or NUL (`%2F`, `%5C`, `%00`): Envoy refuses these by default too, and
   there is no meaning the router, the policy and the app would all agree on;
3. percent-escapes of unreserved characters (ALPHA DIGIT `-._~`) are decoded and the
   hex of every other escape is upper-cased (`%2e` -> `.`, `%3a` -> `%3A`);
4. dot segments are removed (RFC 3986 §5.2.4), then repeated slashes are merged
   (Istio's `MERGE_SLASHES`, Envoy's order: `/a//../b` is `/a/b`).

The result is idempotent and never holds `//`, a `.` or `..` segment, or `%2F`.

Options (`Normalization`; the defaults are the safe choice, each is a place where
apps disagree about what a path means, so the proxy refuses rather than guess):

- `merge_slashes` (default on): off is Istio's `BASE`.
- `path_parameters` (default `"reject"`): a `;` in the path is refused with 400.
  Servlet containers (Tomcat, Jetty, Spring) strip `;params` from each segment, so
  `/admin;x` is `/admin` to them but not to a policy on `/admin`. `"keep"` is
  Envoy's behaviour: `;` is an ordinary character, except that a segment whose part
  before `;` is `.` or `..` is a dot segment (`/a/..;x/b` -> `/b`; Envoy fixed its
  normaliser to do this in 1.39.1). Either way `/public;x/../admin` never routes as
  `/public`: the `..` removes `public;x`.
- `reject_invalid_utf8` (default on): percent-escapes must decode to valid UTF-8, so
  overlong forms (`%C1%A1` for `a`, `%C0%AE` for `.`) that a lenient decoder turns
  into ordinary characters are refused, as Envoy's header validator does.
- `reject_trailing_dot_or_space` (default on): a segment ending in `.` or a space
  (`/admin.`, `/admin%20`) is refused; Windows, IIS and some frameworks drop them and
  serve `/admin`.
- `strip_trailing_host_dot` (default on, Envoy's `strip_trailing_host_dot`):
  `public.example.com.` routes and is authorized (and forwarded) as
  `public.example.com`.
- `drop_override_headers` (default on): `X-HTTP-Method-Override`, `X-HTTP-Method`,
  `X-Method-Override`, `X-Original-URL` and `X-Rewrite-URL` are removed from the
  request before routing, authorization and forwarding: frameworks that honour them
  would otherwise serve a method or path that no policy saw.

Host (`normalize_authority`): an authority is `host[:port]`, where host is an
`[IPv6]` literal or a name of letters, digits, `-` and `_` in non-empty
dot-separated labels (which covers IPv4); the port is 1-5 digits up to 65535 (an
empty port is dropped). The name is lower-cased. Percent-escapes and RFC 3986
sub-delims (`,;=!$&'()*+`) are legal in a reg-name but in no DNS name or mesh host,
and values such as `target, client` or `>` were reaching the router: refused.

Absolute-form (RFC 9112 §3.2.2): the URI's authority replaces Host; the Host field is
still validated (and must appear at most once) but its value is dropped, and the
engine rewrites the forwarded Host field to the authority.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

from .wire import RequestTarget

_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_MAX_HOST_LENGTH = 255
# what may appear in a request target: visible ASCII only (RFC 9112 §3.2 / RFC 3986)
_NOT_TARGET_CHAR = re.compile(r"[^\x21-\x7e]")

OVERRIDE_HEADERS = frozenset(
    (
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-url",
        "x-rewrite-url",
    )
)


class InvalidTarget(ValueError):
    """A request target or Host the proxy refuses to route or forward (answered 400).

    The message names what is wrong without repeating the value sent.
    """


@dataclass(frozen=True, slots=True)
class Normalization:
    """How request targets are normalised; the module docstring explains each option."""

    merge_slashes: bool = True
    path_parameters: Literal["reject", "keep"] = "reject"
    reject_invalid_utf8: bool = True
    reject_trailing_dot_or_space: bool = True
    strip_trailing_host_dot: bool = True
    drop_override_headers: bool = True

    def __post_init__(self) -> None:
        if self.path_parameters not in ("reject", "keep"):
            raise ValueError(
                f"Normalization.path_parameters must be 'reject' or 'keep', "
                f"got {self.path_parameters!r}"
            )


DEFAULT_NORMALIZATION = Normalization()


def normalize_request_target(
    method: str,
    target: RequestTarget,
    host_header: str | None,
    rules: Normalization = DEFAULT_NORMALIZATION,
) -> RequestTarget:
    """`target` with its authority and path normalised.

    `host_header` is the (single) Host field value, or None when absent: it is
    validated even when an absolute-form authority replaces it (RFC 9112 §3.2).
    """
    if host_header is not None and target.absolute_form:
        normalize_authority(host_header, rules)  # validated, then ignored
    authority = normalize_authority(target.authority, rules) if target.authority else ""
    path = target.path
    if method != "CONNECT" and path != "*":
        path = normalize_path(path, rules)
    if authority is target.authority and path is target.path:
        return target
    return RequestTarget(target.absolute_form, target.scheme, authority, path)


def normalize_authority(value: str, rules: Normalization = DEFAULT_NORMALIZATION) -> str:
    """A validated, normalised `host[:port]` (see module doc); "" stays ""."""
    if not value:
        return value
    if value[0] == "[":
        end = value.find("]")
        if end < 0:
            raise InvalidTarget("invalid Host: unterminated IPv6 literal")
        literal, rest = value[1:end], value[end + 1 :]
        try:
            if "%" in literal:  # a zone id names an interface of the client's host
                raise ValueError
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise InvalidTarget("invalid Host: not an IPv6 address") from None
        host = "[" + literal.lower() + "]"
        if rest and rest[0] != ":":
            raise InvalidTarget("invalid Host: characters after the IPv6 literal")
        port = rest[1:] if rest else None
    else:
        name, sep, port_text = value.rpartition(":")
        if not sep:
            name, port = value, None
        else:
            port = port_text
        host = _normalize_name(name, rules)
    if port is None or port == "":
        return host if host != value else value
    if not (port.isascii() and port.isdigit()) or len(port) > 5 or int(port) > 65535:
        raise InvalidTarget("invalid Host: port must be a number up to 65535")
    normalized = f"{host}:{port}"
    return value if normalized == value else normalized


def _normalize_name(name: str, rules: Normalization) -> str:
    if not name:
        raise InvalidTarget("invalid Host: empty host name")
    if len(name) > _MAX_HOST_LENGTH:
        raise InvalidTarget("invalid Host: host name too long")
    lowered = name.lower()
    # one trailing dot (a fully qualified name) is valid; stripped when asked
    labels = lowered[:-1] if lowered.endswith(".") and len(lowered) > 1 else lowered
    if rules.strip_trailing_host_dot:
        lowered = labels
    for label in labels.split("."):
        if not label:
            raise InvalidTarget("invalid Host: empty label in host name")
        if not _LABEL_CHARS.issuperset(label):
            raise InvalidTarget(
                "invalid Host: only letters, digits, '-', '_' and '.' are allowed in a host name"
            )
    return lowered


def normalize_path(target: str, rules: Normalization = DEFAULT_NORMALIZATION) -> str:
    """The normalised origin-form target, query string kept as sent (see module doc).

    Raises `InvalidTarget` for targets that cannot be normalised safely.
    """
    end = target.find("?")
    if end < 0:
        end = len(target)
    # Fast path: nothing to decode, merge, resolve or refuse. `str.find` with bounds
    # looks at the path part only without slicing; most requests leave here unchanged.
    if (
        target.startswith("/")
        and target.isascii()
        and target.find("%", 0, end) < 0
        and target.find("//", 0, end) < 0
        and target.find("/.", 0, end) < 0
        and target.find("\\", 0, end) < 0
        and target.find("\x00", 0, end) < 0
        and _NOT_TARGET_CHAR.search(target) is None
        and "#" not in target
        and (rules.path_parameters == "keep" or target.find(";", 0, end) < 0)
        and not (
            rules.reject_trailing_dot_or_space
            and (target.find("./", 0, end) >= 0 or target.endswith(".", 0, end))
        )
    ):
        return target
    if "#" in target:
        # Clients never send fragments; Envoy refuses them rather than guess where the
        # path ends.
        raise InvalidTarget("fragment ('#') in request target")
    path = _normalize_slow(target[:end], rules)
    if _NOT_TARGET_CHAR.search(target, end) is not None:
        raise InvalidTarget("space, control or non-ASCII character in the query")
    return path + target[end:]


def _normalize_slow(path: str, rules: Normalization) -> str:
    if not path.startswith("/"):
        raise InvalidTarget("request path must start with '/'")
    if "\\" in path:
        raise InvalidTarget("backslash in request path")
    if "\x00" in path:
        raise InvalidTarget("NUL character in request path")
    if not path.isascii():
        raise InvalidTarget("non-ASCII character in request path (percent-encode it)")
    if _NOT_TARGET_CHAR.search(path) is not None:
        raise InvalidTarget("space or control character in request path (percent-encode it)")
    if ";" in path and rules.path_parameters == "reject":
        raise InvalidTarget("path parameter (';') in request path")
    if "%" in path:
        path = _decode_unreserved(path)
        if "%2F" in path or "%5C" in path:
            raise InvalidTarget("encoded slash or backslash (%2F, %5C) in request path")
        if "%00" in path:
            raise InvalidTarget("encoded NUL (%00) in request path")
        if rules.reject_invalid_utf8 and "%" in path:
            _check_utf8(path)
    return _remove_dot_segments_and_merge(path, rules)


def _decode_unreserved(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        pair = part[:2]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise InvalidTarget("malformed percent-encoding in request path")
        char = chr(int(pair, 16))
        if char in _UNRESERVED:
            out.append(char)
        else:
            out.append("%" + pair.upper())
        out.append(part[2:])
    return "".join(out)


def _check_utf8(path: str) -> None:
    """Escapes left after `_decode_unreserved` (well-formed, upper-case) must decode
    to UTF-8; Python's strict decoder refuses overlong forms and surrogates."""
    parts = path.split("%")
    raw = bytearray(parts[0].encode("ascii"))
    for part in parts[1:]:
        raw.append(int(part[:2], 16))
        raw += part[2:].encode("ascii")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidTarget("percent-encoding in request path is not valid UTF-8") from None


def _remove_dot_segments_and_merge(path: str, rules: Normalization) -> str:
    # `path` starts with "/": segments after the first slash. Empty segments take part
    # in dot removal (RFC 3986: `..` pops the empty segment of `//`), then are merged.
    segments = path.split("/")[1:]
    keep_parameters = rules.path_parameters == "keep"
    kept: list[str] = []
    for segment in segments:
        dots = segment.partition(";")[0] if keep_parameters else segment
        if dots == ".":
            continue
        if dots == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    if rules.reject_trailing_dot_or_space:
        for segment in kept:
            if segment.endswith((".", "%20")):
                raise InvalidTarget("path segment ending in '.' or a space")
    # A path ending in `/`, `/.` or `/..` names a directory: keep the trailing slash
    # (RFC 3986 `/a/b/..` -> `/a/`).
    last = segments[-1].partition(";")[0] if keep_parameters else segments[-1]
    if rules.merge_slashes:
        names = [segment for segment in kept if segment]
        trailing = "/" if last in ("", ".", "..") else ""
    else:
        # unmerged, an empty last segment is the trailing slash already
        names = kept
        trailing = "/" if last in (".", "..") else ""
    if not names:
        return "/"
    return "/" + "/".join(names) + trailing
