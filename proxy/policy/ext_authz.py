"""CUSTOM authorization with an external HTTP authorizer: Envoy's ext_authz HTTP
service semantics, as Istio configures them from `envoyExtAuthzHttp`. Pure: what to
send, and what the answer means; `proxy.ext_authz` does the exchange.

- The check request has the original method, `pathPrefix` + the original path (query
  included) and only these headers: Host, Authorization, Content-Length, plus those
  named in `includeRequestHeadersInCheck`. Its body is empty (Content-Length: 0, as
  Envoy), or with `includeRequestBodyInCheck` the request body up to
  `maxRequestBytes` (`x-envoy-auth-partial-body: true` when cut short).
- 200 allows: headers named in `headersToUpstreamOnAllow` are set on the request
  forwarded upstream, those named in `headersToDownstreamOnAllow` are added to the
  upstream's answer to the client.
- Any other status denies with that status and body; the authorizer's headers named
  in `headersToDownstreamOnDeny` reach the client (all but hop-by-hop and framing
  ones when the list is empty, as Envoy does).
- No answer (connection failure, timeout): allowed with `failOpen`, else refused
  with `statusOnError` (default 403). Both flagged `UAEX` as Envoy does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from mesh.compiled import ExtAuthzProvider
from proxy.response_flags import ResponseFlag

ALWAYS_SENT = ("host", "authorization")
# never copied from the authorizer's denial to the client: hop-by-hop and framing
_NOT_FORWARDED = frozenset(
    ("connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-connection", "content-length", "host", "server", "date")
)  # fmt: skip
# Envoy's response flag for a request refused by the external authorizer
EXT_AUTHZ_FLAG = ResponseFlag.UNAUTHORIZED_EXTERNAL_SERVICE


class CheckRequest(NamedTuple):
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes = b""


class CheckResult(NamedTuple):
    allowed: bool
    status: int = 200
    body: bytes = b""
    # set on the upstream request (allowed); sent to the client (denied)
    upstream_headers: tuple[tuple[str, str], ...] = ()
    downstream_headers: tuple[tuple[str, str], ...] = ()
    error: str = ""


def check_request(
    provider: ExtAuthzProvider,
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]],
    body: bytes = b"",
    *,
    partial_body: bool = False,
) -> CheckRequest:
    wanted = {*ALWAYS_SENT, *provider.include_request_headers}
    sent = [(n, v) for n, v in headers if n in wanted]
    sent.append(("content-length", str(len(body))))
    if partial_body:
        sent.append(("x-envoy-auth-partial-body", "true"))
    return CheckRequest(method, provider.path_prefix + path, sent, body)


def check_result(
    provider: ExtAuthzProvider, status: int, headers: Sequence[tuple[str, str]], body: bytes
) -> CheckResult:
    if status == 200:
        return CheckResult(
            True,
            upstream_headers=_named(headers, provider.headers_to_upstream_on_allow),
            downstream_headers=_named(headers, provider.headers_to_downstream_on_allow),
        )
    if provider.headers_to_downstream_on_deny:
        downstream = _named(headers, provider.headers_to_downstream_on_deny)
    else:
        downstream = tuple((n, v) for n, v in headers if n not in _NOT_FORWARDED)
    return CheckResult(False, status, body, downstream_headers=downstream)


def check_failed(provider: ExtAuthzProvider, error: str) -> CheckResult:
    if provider.fail_open:
        return CheckResult(True, error=error)
    return CheckResult(False, provider.status_on_error, error=error)


def _named(headers: Sequence[tuple[str, str]], names: Sequence[str]) -> tuple[tuple[str, str], ...]:
    wanted = frozenset(names)
    return tuple((n, v) for n, v in headers if n in wanted)


def with_upstream_headers(
    headers: list[tuple[str, str]], result: CheckResult
) -> list[tuple[str, str]]:
    """The request headers with the authorizer's allowed ones set (replacing any the
    client sent under those names)."""
    if not result.upstream_headers:
        return headers
    replaced = {n for n, _ in result.upstream_headers}
    return [(n, v) for n, v in headers if n not in replaced] + list(result.upstream_headers)
