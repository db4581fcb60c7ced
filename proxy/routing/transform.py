"""Apply a chosen route to the request: path and authority rewrites, header operations
and redirects, with Istio's semantics as Envoy implements them."""

from __future__ import annotations

from mesh.compiled import HeaderOps, HTTPMatch, HTTPRoute, Redirect, WeightedDestination

from .request import authority_without_port

Header = tuple[str, str]

_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def rewrite_path(route: HTTPRoute, matched: HTTPMatch | None, path: str) -> str:
    """The path to send upstream. With a `prefix` uri match, `rewrite.uri` replaces the
    matched prefix (`/api/v1/x` with prefix `/api/v1` and rewrite `/v2` -> `/v2/x`);
    with any other match, or none, it replaces the whole path. The query string is
    always kept.
    """
    rewrite = route.rewrite
    # proto3 leaves an unset string empty, so "" means "no rewrite", not "rewrite to ''".
    if rewrite is None or not rewrite.uri:
        return path
    q = path.find("?")
    uri, query = (path, "") if q < 0 else (path[:q], path[q:])
    prefix = matched.uri if matched is not None else None
    if prefix is not None and prefix.kind == "prefix":
        return rewrite.uri + uri[len(prefix.value) :] + query
    return rewrite.uri + query


def _authority_from_ops(ops: HeaderOps) -> str | None:
    # Istio turns `host`/`:authority` in headers.request.set or .add into an authority
    # rewrite (Envoy cannot mutate them as headers); validation allows only one source.
    for table in (ops.set, ops.add):
        for name, value in table.items():
            if _is_authority(name):
                return value
    return None


def _is_authority(name: str) -> bool:
    lowered = name.lower()
    return lowered == "host" or lowered == ":authority"


def request_authority(
    route: HTTPRoute, destination: WeightedDestination | None, authority: str
) -> str:
    """The Host to send upstream. Envoy applies the destination's host rewrite first
    and the route's last, so a route-level rewrite wins over a destination-level one."""
    if route.rewrite is not None and route.rewrite.authority:
        return route.rewrite.authority
    from_route = _authority_from_ops(route.headers.request)
    if from_route:
        return from_route
    if destination is not None:
        from_destination = _authority_from_ops(destination.headers.request)
        if from_destination:
            return from_destination
    return authority


def apply_header_ops(headers: list[Header], ops: HeaderOps) -> list[Header]:
    """Apply one HeaderOps: `remove` drops every value, `set` replaces every value with
    one, `add` appends a value. Names compare case-insensitively. As in Envoy, removal
    happens first, then `set`, then `add`, so `set` + `add` of one name leaves two
    values. Pseudo-headers and `host` are never touched (see `request_authority`).

    Returns `headers` itself when `ops` is empty, otherwise a new list.
    """
    if not ops.set and not ops.add and not ops.remove:
        return headers
    drop = {name.lower() for name in ops.remove}
    drop.update(name.lower() for name in ops.set)
    drop.difference_update(("host", ":authority"))
    out = [h for h in headers if h[0].lower() not in drop] if drop else list(headers)
    for table in (ops.set, ops.add):
        for name, value in table.items():
            if not name.startswith(":") and name.lower() != "host":
                out.append((name, value))
    return out


def apply_request_header_ops(
    headers: list[Header], route: HTTPRoute, destination: WeightedDestination | None
) -> list[Header]:
    """Route- and destination-level request header operations in Envoy's order.

    Envoy's weighted-cluster entry evaluates its own (destination-level) mutations and
    then the route's (`WeightedClusterEntry::finalizeRequestHeaders` calls the parent
    last), so when both levels `set` one header the route-level value is what is sent.
    """
    if destination is not None:
        headers = apply_header_ops(headers, destination.headers.request)
    return apply_header_ops(headers, route.headers.request)


def apply_response_header_ops(
    headers: list[Header], route: HTTPRoute, destination: WeightedDestination | None
) -> list[Header]:
    """Response header operations, in the same order as `apply_request_header_ops`."""
    if destination is not None:
        headers = apply_header_ops(headers, destination.headers.response)
    return apply_header_ops(headers, route.headers.response)


def redirect_location(
    redirect: Redirect, scheme: str, authority: str, path: str, matched: HTTPMatch | None = None
) -> tuple[int, str]:
    """(status, Location) for a redirect rule, as Envoy builds it from Istio's fields.

    - `uri` replaces the whole path, whatever kind of match fired; the request's query
      string is kept unless `uri` carries its own.
    - `authority` replaces the whole authority; `port` replaces or adds the port.
    - `scheme` replaces the scheme; when it changes, a port that was only the old
      scheme's default (`:80` for http) is dropped, so http://a:80 -> https://a.
    - `prefix_rewrite` replaces the prefix a `prefix` uri match matched (`matched`),
      the rest of the path and the query string kept.
    - status is `redirect_code`, 301 by default.
    """
    new_scheme = redirect.scheme or scheme
    if redirect.authority:
        host = redirect.authority
    else:
        host = authority
        if new_scheme != scheme:
            default_port = _DEFAULT_PORTS.get(scheme.lower())
            if default_port and host.endswith(default_port):
                host = authority_without_port(host)
    if redirect.port:
        host = f"{authority_without_port(host)}:{redirect.port}"
    prefix = matched.uri if matched is not None else None
    if redirect.prefix_rewrite is not None and prefix is not None and prefix.kind == "prefix":
        new_path = redirect.prefix_rewrite + path[len(prefix.value) :]
    elif redirect.uri:
        if "?" in redirect.uri:
            new_path = redirect.uri
        else:
            q = path.find("?")
            new_path = redirect.uri if q < 0 else redirect.uri + path[q:]
    else:
        new_path = path
    return redirect.redirect_code or 301, f"{new_scheme}://{host}{new_path}"
