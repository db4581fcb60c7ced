"""Why a request took the route it did: the matcher's verdict, with reasons.

`explain_routes` walks the same compiled rules `select_route` walks (the tables built
by `compile_routes` / `compile_virtual_hosts`) and, for every rule up to the one that
wins, names the first condition that failed. The verdict of each rule comes from the
matcher itself (`_CompiledMatch.test`); the reasons reuse its compiled predicates in
the order `test` checks them, so an explanation cannot disagree with the proxy: if the
walk ever found no failing condition where `test` said no (or the reverse), that is a
bug here and `explain_routes` raises instead of printing a wrong story.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from mesh.compiled import HTTPMatch, HTTPRoute

from .match import MESH_GATEWAY, CompiledRoutes, RouteMatch, _at_gateway, _CompiledMatch
from .request import RequestAttrs, authority_without_port, parse_query


class RuleVerdict(NamedTuple):
    """One (rule, match) pair as the matcher saw it.

    `rule_index` is the rule's position in the VirtualService's `http` list,
    `match_index` the position of the `match` entry (-1: the rule has no conditions);
    `failed` is "" when the pair matched, else the first condition that did not hold.
    """

    rule_index: int
    match_index: int
    route: HTTPRoute
    match: HTTPMatch | None
    matched: bool
    failed: str


class RouteExplanation(NamedTuple):
    """`chosen` is what `select_route` returns; `verdicts` every pair tried, in order,
    ending with the winner (or with the last rule when nothing matched).
    `host_found` is False when a gateway's table has no virtual host for the
    request's Host (then there are no verdicts)."""

    chosen: RouteMatch | None
    verdicts: tuple[RuleVerdict, ...]
    host_found: bool


class ExplainMismatch(AssertionError):
    """The explanation walk and the matcher disagreed (a bug in this module)."""


def _shown(value: str | None) -> str:
    return "absent" if value is None else repr(value)


def explain_condition(
    compiled: _CompiledMatch,
    req: RequestAttrs,
    uri: str,
    uri_lower: str,
    query: Mapping[str, str],
    match: HTTPMatch,
) -> str:
    """The first condition of `compiled` that `req` fails, in `test`'s order, as a
    sentence; "" when every condition holds."""
    if (
        compiled.port
        and req.port != compiled.port
        and not (compiled.port_implicit and req.port == 0)
    ):
        return f"port: request port {req.port or 'unset'} is not {compiled.port}"
    if compiled.gateways is not None and not _at_gateway(compiled.gateways, req.gateway):
        where = req.gateway or MESH_GATEWAY
        return f"gateways: evaluated at {where!r}, rule is for {sorted(compiled.gateways)}"
    if compiled.source_namespace and req.source_namespace != compiled.source_namespace:
        return (
            f"sourceNamespace: caller namespace {req.source_namespace!r} "
            f"is not {compiled.source_namespace!r}"
        )
    for key, wanted in compiled.source_labels:
        have = req.source_labels.get(key)
        if have != wanted:
            return f"sourceLabels: caller label {key}={_shown(have)}, rule wants {wanted!r}"
    if compiled.method is not None and not compiled.method(req.method):
        return f"method: {req.method!r} does not match {_describe(match.method)}"
    if compiled.scheme is not None and not compiled.scheme(req.scheme):
        return f"scheme: {req.scheme!r} does not match {_describe(match.scheme)}"
    if compiled.uri is not None and not compiled.uri(uri_lower if compiled.uri_folded else uri):
        case = " (case-insensitive)" if match.ignore_uri_case else ""
        return f"uri: {uri!r} does not match {_describe(match.uri)}{case}"
    if compiled.authority is not None and not compiled.authority(req.authority):
        bare = authority_without_port(req.authority)
        if bare == req.authority or not compiled.authority(bare):
            return f"authority: {req.authority!r} does not match {_describe(match.authority)}"
    for name, matcher in compiled.headers:
        value = req.headers.get(name)
        if value is None:
            return f"headers[{name}]: header absent, rule wants {_describe(_header(match, name))}"
        if not matcher(value):
            return f"headers[{name}]: value does not match {_describe(_header(match, name))}"
    for name, without in compiled.without_headers:
        value = req.headers.get(name)
        if value is not None and (without is None or without(value)):
            return f"withoutHeaders[{name}]: header is present"
    for name, matcher in compiled.query:
        value = query.get(name)
        if value is None or not matcher(value):
            sm = match.query_params.get(name)
            return f"queryParams[{name}]: {_shown(value)} does not match {_describe(sm)}"
    return ""


def _header(match: HTTPMatch, lower_name: str) -> object:
    for name, sm in match.headers.items():
        if name.lower() == lower_name:
            return sm
    return None


def _describe(sm: object) -> str:
    kind = getattr(sm, "kind", None)
    value = getattr(sm, "value", None)
    return f"{kind} {value!r}" if kind is not None else "the rule"


def explain_routes(compiled: CompiledRoutes, req: RequestAttrs) -> RouteExplanation:
    """Every rule `select_route` tries for `req`, why each loser lost, and the winner."""
    chosen = compiled.select(req)
    table = compiled._rules_for(req.authority)
    if table is None:
        if chosen is not None:
            raise ExplainMismatch("matcher chose a route for a host without rules")
        return RouteExplanation(None, (), False)
    path = req.path
    q = path.find("?")
    uri = path if q < 0 else path[:q]
    uri_lower = uri.lower()
    query = parse_query(path) if q >= 0 else {}
    verdicts: list[RuleVerdict] = []
    positions = _positions(table.rules)
    for (rule_compiled, result), (rule_index, match_index) in zip(
        table.rules, positions, strict=True
    ):
        if rule_compiled is None:
            verdicts.append(RuleVerdict(rule_index, -1, result.route, None, True, ""))
            break
        assert result.match is not None
        held = rule_compiled.test(req, uri, uri_lower, query)
        reason = explain_condition(rule_compiled, req, uri, uri_lower, query, result.match)
        if held == bool(reason):
            raise ExplainMismatch(
                f"rule {rule_index} match {match_index}: matcher said {held}, walk found {reason!r}"
            )
        verdicts.append(
            RuleVerdict(rule_index, match_index, result.route, result.match, held, reason)
        )
        if held:
            break
    winner = verdicts[-1] if verdicts and verdicts[-1].matched else None
    if (winner is None) != (chosen is None) or (
        winner is not None and chosen is not None and winner.route is not chosen.route
    ):
        raise ExplainMismatch("explanation and matcher chose different rules")
    return RouteExplanation(chosen, tuple(verdicts), True)


def _positions(
    rules: tuple[tuple[_CompiledMatch | None, RouteMatch], ...],
) -> list[tuple[int, int]]:
    """(rule index, match index) of each flattened pair, recovered from the rule
    objects (`_compile_rules` flattens rules in order, one pair per match)."""
    out: list[tuple[int, int]] = []
    rule_index = -1
    previous: HTTPRoute | None = None
    match_index = 0
    for compiled, result in rules:
        if result.route is not previous:
            rule_index += 1
            previous = result.route
            match_index = 0
        else:
            match_index += 1
        out.append((rule_index, -1 if compiled is None else match_index))
    return out
