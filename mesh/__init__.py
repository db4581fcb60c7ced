"""Meshwork's shared core: every component imports it; it imports no component."""

__version__ = "0.1.0"
