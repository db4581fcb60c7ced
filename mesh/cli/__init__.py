"""`meshctl`, the one CLI."""
