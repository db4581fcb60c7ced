"""Istio host semantics.

`reviews` (in the namespace of the resource or caller), `reviews.default` and
`reviews.default.svc.cluster.local` all name the same service; the canonical form is
the fully qualified one. Pure functions, no I/O.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_DOMAIN = "svc.cluster.local"


class ServiceRef(NamedTuple):
    namespace: str
    name: str

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.{DEFAULT_DOMAIN}"

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def strip_port(authority: str) -> str:
    """`reviews:9080` -> `reviews`; `[::1]:80` -> `::1`."""
    if authority.startswith("["):
        end = authority.find("]")
        return authority[1:end] if end > 0 else authority
    head, sep, tail = authority.rpartition(":")
    if sep and tail.isdigit():
        return head
    return authority


def canonical_host(host: str, namespace: str, domain: str = DEFAULT_DOMAIN) -> str:
    """Resolve a short or partly qualified host, as written in `namespace`, to its FQDN.

    Hosts with more dots than `<name>.<ns>` that are not under `domain` (e.g. external
    names like `api.example.com`) are returned lower-cased and unchanged, as Istio does.
    `*` wildcards are kept as written.
    """
    h = strip_port(host.strip()).lower().rstrip(".")
    if not h or h == "*" or h.startswith("*."):
        return h
    if h.endswith("." + domain):
        return h
    parts = h.split(".")
    if len(parts) == 1:
        return f"{h}.{namespace}.{domain}"
    if len(parts) == 2:
        return f"{parts[0]}.{parts[1]}.{domain}"
    if len(parts) == 3 and parts[2] == "svc":
        return f"{parts[0]}.{parts[1]}.{domain}"
    return h


def service_of_host(fqdn: str, domain: str = DEFAULT_DOMAIN) -> ServiceRef | None:
    """The mesh service a canonical host names, or None for hosts outside the mesh domain."""
    suffix = "." + domain
    if not fqdn.endswith(suffix):
        return None
    parts = fqdn[: -len(suffix)].split(".")
    if len(parts) != 2 or not all(parts):
        return None
    return ServiceRef(namespace=parts[1], name=parts[0])


def host_matches(pattern: str, fqdn: str) -> bool:
    """Does a (canonical) host pattern, possibly `*` or `*.suffix`, cover `fqdn`?"""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return fqdn.endswith(pattern[1:])
    return pattern == fqdn
