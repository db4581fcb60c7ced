"""The config service's options (`meshctl serve config --set key=value`), typed and
validated once at start-up.

    root-namespace=istio-system   the mesh's root namespace: a PeerAuthentication
                                  without selector there is mesh-wide, and its
                                  AuthorizationPolicies apply to every namespace
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mesh.debounce import DebounceSettings
from mesh.resources import checks
from services.config.compile_security import DEFAULT_ROOT_NAMESPACE


class ConfigSettingsError(ValueError):
    """The config service cannot start with these options; the message says what to change."""


@dataclass(frozen=True)
class ConfigSettings:
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    push_quiet_ms: int = 5
    push_max_delay_ms: int = 100

    @property
    def push_debounce(self) -> DebounceSettings:
        return DebounceSettings(self.push_quiet_ms / 1000, self.push_max_delay_ms / 1000)

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> ConfigSettings:
        known = ("root-namespace", "push-quiet-ms", "push-max-delay-ms")
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
        quiet = _milliseconds(options, "push-quiet-ms", cls.push_quiet_ms)
        max_delay = _milliseconds(options, "push-max-delay-ms", cls.push_max_delay_ms)
        if max_delay < quiet:
            raise ConfigSettingsError(
                f"push-max-delay-ms ({max_delay}) must be at least push-quiet-ms ({quiet})"
            )
        return cls(root_namespace=root, push_quiet_ms=quiet, push_max_delay_ms=max_delay)


def _milliseconds(options: Mapping[str, str], name: str, default: int) -> int:
    text = options.get(name)
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise ConfigSettingsError(f"{name}: expected whole milliseconds, got {text!r}") from None
    if not 0 <= value <= 60_000:
        raise ConfigSettingsError(f"{name}: must be between 0 and 60000 ms, got {value}")
    return value
