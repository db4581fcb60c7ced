"""HTTP authorization carried by the route configuration (RDS), not the listener.

A listener change reaches only the connections opened after it (Envoy drains the old
ones), while a route configuration change applies to the next request of every open
connection. So the inbound HCM holds a fixed set of RBAC filters, one *slot* per kind
of decision, each configured with no rules (it lets everything through), and the
rules of the moment travel in the inbound route configuration as each slot's
`RBACPerRoute` on the virtual host: a new AuthorizationPolicy is an RDS push, and the
next request on any connection is decided by it, as by the Python sidecar.

The rules themselves are `rbac.rbac_filters`' (HTTP), regrouped by what each filter
decides: its enforcing action (`rules.action`: LOG for AUDIT, DENY, ALLOW) or, for a
dry-run filter, its shadow action. CUSTOM policies (the ext_authz filter and the
shadow RBAC filter that marks its requests) stay in the listener: their filters exist
only while a CUSTOM policy does. TCP (network RBAC) stays on its listener too: a TCP
connection is authorized once, when it opens, on both data planes.
"""

from __future__ import annotations

from collections.abc import Sequence

from .model import TranslationError
from .protos import HTTP_RBAC, HTTP_RBAC_PER_ROUTE, Json, typed

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
# (what the filter decides, its slot's filter name), in the order they run: the order
# `rbac.rbac_filters` emits them in (AUDIT, DENY, ALLOW, then the dry-run ones)
SLOTS: tuple[tuple[tuple[str, str], str], ...] = (
    (("rules", "LOG"), "meshwork.rbac.audit"),
    (("rules", "DENY"), "meshwork.rbac.deny"),
    (("rules", "ALLOW"), "meshwork.rbac.allow"),
    (("shadowRules", "DENY"), "meshwork.rbac.dry_run_deny"),
    (("shadowRules", "ALLOW"), "meshwork.rbac.dry_run_allow"),
)


def slot_filters() -> list[Json]:
    """The listener's RBAC filters: every slot, none with rules of its own."""
    return [{"name": name, "typedConfig": typed(HTTP_RBAC)} for _, name in SLOTS]


def split(filters: Sequence[Json]) -> tuple[list[Json], Json]:
    """`rbac.rbac_filters` (HTTP) -> (the filters that stay in the listener: CUSTOM's
    then every slot; the virtual host's `typedPerFilterConfig` giving each slot in use
    its rules)."""
    kept: list[Json] = []
    per_route: Json = {}
    slot_of = dict(SLOTS)
    for i, f in enumerate(filters):
        if f["name"] == EXT_AUTHZ_FILTER or (
            f["name"] == HTTP_RBAC_FILTER
            and i + 1 < len(filters)
            and filters[i + 1]["name"] == EXT_AUTHZ_FILTER
        ):
            kept.append(f)  # CUSTOM: the ext_authz filter and the RBAC that marks for it
            continue
        body = {k: v for k, v in f["typedConfig"].items() if k != "@type"}
        kind = "rules" if "rules" in body else "shadowRules"
        slot = slot_of.get((kind, body.get(kind, {}).get("action", "")))
        if f["name"] != HTTP_RBAC_FILTER or slot is None or slot in per_route:
            # a filter this module does not know how to carry per route: better to
            # refuse the translation than to drop a policy
            raise TranslationError(
                "inbound_http", f"http_filters[{i}]", f["name"], "cannot be carried per route"
            )
        per_route[slot] = typed(HTTP_RBAC_PER_ROUTE, {"rbac": body})
    return [*kept, *slot_filters()], per_route
