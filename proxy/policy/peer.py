"""Effective PeerAuthentication mode of one workload port (Istio semantics).

The most specific policy wins: a workload policy whose selector matches the labels,
then the namespace policy, then the mesh-wide one. Among several candidates of the
same scope the oldest (`create_revision`, then name) wins, as Istio does. A port-level
mode of the chosen workload policy beats its workload-level mode for that port. UNSET
at any level inherits from the next wider scope; with nothing set the mode is
PERMISSIVE (Istio's default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from mesh.compiled import MtlsMode, PeerAuthn

EffectiveMode = Literal["STRICT", "PERMISSIVE", "DISABLE"]

_SCOPE_ORDER = ("workload", "namespace", "mesh")


def _oldest(candidates: list[PeerAuthn]) -> PeerAuthn | None:
    return min(candidates, key=lambda p: (p.create_revision, p.name), default=None)


def effective_mtls(
    policies: Sequence[PeerAuthn], labels: Mapping[str, str], port: int
) -> EffectiveMode:
    """The mode the inbound listener enforces on `port` (the workload's app port)."""
    by_scope: dict[str, list[PeerAuthn]] = {scope: [] for scope in _SCOPE_ORDER}
    for policy in policies:
        if policy.scope == "workload" and not all(
            labels.get(key) == value for key, value in policy.selector.items()
        ):
            continue
        by_scope[policy.scope].append(policy)

    modes: list[MtlsMode] = []
    for scope in _SCOPE_ORDER:
        chosen = _oldest(by_scope[scope])
        if chosen is None:
            continue
        if scope == "workload":
            modes.append(chosen.port_modes.get(port, "UNSET"))
        modes.append(chosen.mode)
    for mode in modes:
        if mode != "UNSET":
            return mode
    return "PERMISSIVE"
