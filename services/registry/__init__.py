"""Service discovery: workload instances under leases, endpoint sets pushed on change."""

from services.registry.service import RegistryService

__all__ = ["RegistryService"]
