"""Request-target path normalisation, shared by authorization and forwarding.

The inbound sidecar authorizes the normalised path and forwards that same path to the
app, so a policy on `/admin` cannot be bypassed by `//admin`, `/./admin`,
`/%61dmin` or `/public/../admin`: what the policy saw is what the app receives.

Semantics follow Envoy as configured by Istio's `MERGE_SLASHES` path normalisation:

1. the query (from the first `?`) is split off and re-appended untouched;
2. percent-escapes of unreserved characters (ALPHA DIGIT `-._~`) are decoded and the
   hex of every other escape is upper-cased (`%2e` -> `.`, `%3a` -> `%3A`);
3. an encoded slash or backslash (`%2F`, `%5C`), an encoded NUL (`%00`), a raw
   backslash or NUL, a malformed escape (`%zz`, a trailing `%`), a fragment (`#`) or a
   path not starting with `/` is rejected with `PathError` (400): Envoy rejects
   these by default too, and there is no meaning the app and the policy would both
   agree on;
4. dot segments are removed as in RFC 3986 §5.2.4, then repeated slashes merged.
   This is Envoy's order (`normalize_path`, then `merge_slashes`), so `/a//../b` is
   `/a/b` (the `..` removes the empty segment between the slashes).

The result is idempotent and never contains `//`, a `.` or `..` segment, or `%2F`.
"""

from __future__ import annotations

from mesh.errors import BadRequest

_HEX = frozenset("0123456789abcdefABCDEF")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


class PathError(BadRequest):
    """A request target the sidecar refuses to authorize or forward (answered 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="path")


def normalize_path(target: str) -> str:
    """The normalised request target (origin form), query string kept as sent.

    Raises `PathError` for targets that cannot be normalised safely (see module doc).
    """
    end = target.find("?")
    if end < 0:
        end = len(target)
    # Fast path: nothing to decode, merge or resolve. `str.find` with bounds looks at
    # the path part only without slicing; most requests leave here unchanged.
    if (
        target.startswith("/")
        and target.find("%", 0, end) < 0
        and target.find("//", 0, end) < 0
        and target.find("/.", 0, end) < 0
        and target.find("\\", 0, end) < 0
        and target.find("\x00", 0, end) < 0
        and "#" not in target
    ):
        return target
    if "#" in target:
        # Clients never send fragments; Envoy rejects them rather than guess where the
        # path ends.
        raise PathError("fragment ('#') in request target")
    return _normalize_slow(target[:end]) + target[end:]


def _normalize_slow(path: str) -> str:
    if not path.startswith("/"):
        raise PathError("request path must start with '/'")
    if "\\" in path:
        raise PathError("backslash in request path")
    if "\x00" in path:
        raise PathError("NUL character in request path")
    if "%" in path:
        path = _decode_unreserved(path)
        if "%2F" in path or "%5C" in path:
            raise PathError("encoded slash or backslash (%2F, %5C) in request path")
        if "%00" in path:
            raise PathError("encoded NUL (%00) in request path")
    return _remove_dot_segments_and_merge(path)


def _decode_unreserved(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        pair = part[:2]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise PathError("malformed percent-encoding in request path")
        char = chr(int(pair, 16))
        if char in _UNRESERVED:
            out.append(char)
        else:
            out.append("%" + pair.upper())
        out.append(part[2:])
    return "".join(out)


def _remove_dot_segments_and_merge(path: str) -> str:
    # `path` starts with "/": segments after the first slash. Empty segments take part
    # in dot removal (RFC 3986: `..` pops the empty segment of `//`), then are merged.
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == ".":
            continue
        if segment == "..":
            if kept:
                kept.pop()
            continue
        kept.append(segment)
    names = [segment for segment in kept if segment]
    if not names:
        return "/"
    # A path ending in `/`, `/.` or `/..` names a directory: keep the trailing slash
    # (RFC 3986 `/a/b/..` -> `/a/`).
    trailing = "/" if segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(names) + trailing
