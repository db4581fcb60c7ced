"""The config service's options (`meshctl serve config --set key=value`), typed and
validated once at start-up.

    root-namespace=istio-system   the mesh's root namespace: a PeerAuthentication
                                  without selector there is mesh-wide, and its
                                  AuthorizationPolicies apply to every namespace
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.resources import checks
from services.config.compile_security import DEFAULT_ROOT_NAMESPACE


class ConfigSettingsError(ValueError):
    """The config service cannot start with these options; the message says what to change."""


@dataclass(frozen=True)
class ConfigSettings:
    root_namespace: str = DEFAULT_ROOT_NAMESPACE

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> ConfigSettings:
        known = ("root-namespace",)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigSettingsError(
                f"unknown option(s) {', '.join(unknown)}; the config service knows "
                f"{', '.join(known)}"
            )
        root = options.get("root-namespace", DEFAULT_ROOT_NAMESPACE).strip()
        problem = checks.dns_label(root)
        if problem is not None:
            raise ConfigSettingsError(f"root-namespace: {problem}")
        return cls(root_namespace=root)
