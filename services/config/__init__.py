"""Istio-compatible config: validates and stores resources, compiles and pushes proxy config."""

from services.config.service import ConfigService

__all__ = ["ConfigService"]
