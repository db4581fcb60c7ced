"""Traffic mirroring decisions (a rule's `mirror` / `mirrorPercentage`). Pure.

The data path sends a copy of a sampled request to the mirror destination, fire and
forget: the copy's response is discarded and the primary request never waits for it.
The copy's authority gets Envoy's `-shadow` suffix, so the mirror's access logs and
metrics tell shadow traffic apart.
"""

from __future__ import annotations

from ._sampling import percent_hit


def should_mirror(percentage: float, rand: float) -> bool:
    """Whether to mirror a request, from a uniform draw in [0, 1) (Envoy resolution)."""
    return percent_hit(percentage, rand)


def mirror_authority(authority: str) -> str:
    """`reviews:9080` -> `reviews-shadow:9080`: the suffix goes on the host, before
    any port, as Envoy's `shadowAppendedHost` does (IPv6 literals keep their port)."""
    if authority.startswith("["):
        close = authority.find("]")
        if close != -1:
            return f"{authority[: close + 1]}-shadow{authority[close + 1 :]}"
    host, sep, port = authority.rpartition(":")
    if sep and host and port.isdigit():
        return f"{host}-shadow:{port}"
    return f"{authority}-shadow"
