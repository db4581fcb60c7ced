"""The certificate authority: workload certificates for SPIFFE identities, the trust
bundle, bootstrap tokens and root rotation."""

from services.ca.service import CAService

__all__ = ["CAService"]
